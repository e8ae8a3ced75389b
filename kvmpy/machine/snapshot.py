"""Static migration: the whole machine to a stream and back (QEMU's `migrate "file:..."` /
`-incoming file:...`, and `exec:`).

A stream carries, in order: the machine's identity (CONFIG: memory layout, vCPU count, device
table with each device's configuration, the CPUID each vCPU was given), its state (STATE: the
VM's irqchip/PIT/clock, every vCPU, every device), guest RAM, END. The destination is built from
its own flags (as QEMU's is), checks the identity against itself and this host *before any vCPU
exists*, and refuses with one line naming the first difference. A `file:` snapshot's RAM is
mapped copy-on-write from the file, so a restore's cost does not grow with guest RAM.

The wire format (kvmpy.migrate.codec/stream/uri) knows nothing of machines: it sits below this
module, and live migration (kvmpy.migrate, above) reuses both.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmpy.boot.cpuid import AMD_ECX_CMP_LEGACY, ECX_HYPERVISOR, ECX_TSC_DEADLINE, EDX_HTT
from kvmpy.errors import KvmpyError, MigrationError, StateError
from kvmpy.machine.runstate import RunState
from kvmpy.machine.vmstate import VmState
from kvmpy.memslots import GuestMemory
from kvmpy.migrate.codec import encode_state
from kvmpy.migrate.decoder import decode_state
from kvmpy.memslots.layout import ram_ranges
from kvmpy.migrate.reader import StreamReader, check_file_ranges
from kvmpy.migrate.stream import SectionKind, StreamWriter
from kvmpy.migrate.uri import open_restore_source, open_save_target, parse_uri
from kvmpy.state import versioned
from kvmpy.vcpu.state import VcpuState

if TYPE_CHECKING:
    from kvmpy.machine.lifecycle import Machine

log = logging.getLogger(__name__)

KVMPY_VERSION = "0.1.0"
# CPUID feature words a destination must support bit for bit: (function, index, register)
FEATURE_WORDS = ((1, 0, "ecx"), (1, 0, "edx"), (7, 0, "ebx"), (7, 0, "ecx"), (7, 0, "edx"),
                 (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"), (0xD, 1, "eax"))
REGS = ("eax", "ebx", "ecx", "edx")
# Bits kvmpy sets itself (KVM_GET_SUPPORTED_CPUID leaves them to the VMM): never "missing".
VMM_OWNED_BITS = {(1, 0, "ecx"): ECX_HYPERVISOR | ECX_TSC_DEADLINE, (1, 0, "edx"): EDX_HTT,
                  (0x80000001, 0, "ecx"): AMD_ECX_CMP_LEGACY}


@versioned("machine-identity", 1)
@dataclass
class MachineIdentity:
    """What source and destination must agree on before anything is restored."""
    memory: int
    smp: int
    ram_ranges: list                # [(gpa, size)]
    devices: list                   # [(id, kind, {configuration})]
    cpuid: list                     # per vCPU: [(function, index, flags, eax, ebx, ecx, edx)]
    kvmpy_version: str = KVMPY_VERSION


@versioned("machine", 1)
@dataclass
class MachineState:
    vm: VmState
    vcpus: list                     # [VcpuState]
    devices: dict                   # device id -> that device's versioned state


def identity_of(machine: "Machine") -> MachineIdentity:
    board, cfg = machine.board, machine.config
    return MachineIdentity(memory=cfg.memory, smp=cfg.smp,
                           ram_ranges=[(r.gpa, r.size) for r in machine.memory.ranges],
                           devices=[list(d) for d in board.devices.identity()],
                           cpuid=[[list(e) for e in table] for table in board.cpuid])


def check_identity(saved: object, machine: "Machine", host_cpuid: list[tuple[int, ...]]) -> MachineIdentity:
    """Raise MigrationError naming the first way the snapshot does not fit this machine/host."""
    check_sizes(saved, machine.config.memory, machine.config.smp)

    def refuse(detail: str) -> None:
        raise MigrationError("the snapshot does not fit this machine", detail=detail)
    mine = [list(d) for d in machine.board.devices.identity()]
    theirs = saved.devices if isinstance(saved.devices, list) else []
    mine_ids = {d[0]: d for d in mine}
    their_ids = {d[0]: d for d in theirs if isinstance(d, list) and len(d) == 3
                 and isinstance(d[0], str) and isinstance(d[1], str) and isinstance(d[2], dict)}
    if len(their_ids) != len(theirs):
        refuse("its device table is malformed")
    for id_, d in their_ids.items():
        if id_ not in mine_ids:
            refuse(f"it has device {id_} ({d[1]}), which this machine lacks (give the same device flags)")
        if mine_ids[id_] != d:
            refuse(f"device {id_} differs: the snapshot's is {d[1]} {d[2]}, this machine's "
                   f"{mine_ids[id_][1]} {mine_ids[id_][2]}")
    for id_ in mine_ids:
        if id_ not in their_ids:
            refuse(f"this machine has device {id_} ({mine_ids[id_][1]}), which the snapshot lacks")
    _check_cpuid(saved.cpuid, machine.config.smp, host_cpuid)
    return saved


def check_sizes(saved: object, memory: int, smp: int) -> None:
    """The checks that need no machine built: RAM size and vCPU count."""
    if not isinstance(saved, MachineIdentity):
        raise MigrationError("checking the snapshot", detail=f"its identity is a {type(saved).__name__}")
    for name, value in (("memory", saved.memory), ("smp", saved.smp)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise MigrationError("checking the snapshot", detail=f"its {name} is {value!r}")
    if saved.memory != memory:
        raise MigrationError("the snapshot does not fit this machine",
                             detail=f"it has {saved.memory >> 20} MiB of RAM, this machine {memory >> 20} MiB (-m)")
    if saved.smp != smp:
        raise MigrationError("the snapshot does not fit this machine",
                             detail=f"it has {saved.smp} vCPUs, this machine {smp} (--smp)")


def _check_cpuid(cpuid: object, smp: int, host: list[tuple[int, ...]]) -> None:
    if not (isinstance(cpuid, list) and len(cpuid) == smp and all(
            isinstance(t, list) and len(t) <= 256 and all(
                isinstance(e, list) and len(e) == 7 and all(isinstance(v, int) and 0 <= v < 1 << 32 for v in e)
                for e in t) for t in cpuid)):
        raise MigrationError("checking the snapshot", detail="its CPUID table is malformed")
    supported = {(e[0], e[1]): e for e in host}
    for function, index, reg in FEATURE_WORDS:
        r = 3 + REGS.index(reg)
        for e in cpuid[0]:
            if e[0] == function and e[1] == index:
                host_e = supported.get((function, index))
                missing = e[r] & ~(host_e[r] if host_e else 0) & ~VMM_OWNED_BITS.get((function, index, reg), 0)
                if missing:
                    raise MigrationError("the snapshot does not fit this host",
                                         detail=f"the guest was given CPUID[{function:#x}.{index}].{reg} "
                                                f"bits {missing:#x}, which this host's KVM cannot offer")


def _host_cpuid(machine: "Machine") -> list[tuple[int, ...]]:
    c = machine.kvm.supported_cpuid()
    return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
            for e in (c.entries[i] for i in range(c.nent))]


# -- saving -------------------------------------------------------------------------------------
def save_machine(machine: "Machine", uri: str) -> dict[str, Any]:
    """Pause, write identity + state + RAM to `uri`, leave the machine postmigrate. On failure
    the machine runs again if it ran, and the error propagates. Returns the statistics."""
    target = parse_uri(uri)
    if target.scheme not in ("file", "exec"):
        raise MigrationError(f"saving to {uri}", detail="a snapshot goes to file:PATH or exec:COMMAND "
                                                        "(tcp:/unix: is live migration: migrate())")
    with machine._lock:
        status = machine.run_state
        if machine.board is None or status not in (RunState.RUNNING, RunState.PAUSED,
                                                   RunState.PRELAUNCH, RunState.POSTMIGRATE):
            raise StateError(f"saving to {uri}", detail=f"the machine is {machine.status}")
        started = time.monotonic()
        machine.emit("MIGRATION", {"status": "setup"})
        was_running = status is RunState.RUNNING
        if was_running:
            machine.board.pause()
            machine.emit("STOP")
        paused_at = time.monotonic()
        try:
            machine.emit("MIGRATION", {"status": "active"})
            _flush_disks(machine)
            identity = encode_state(identity_of(machine))
            board = machine.board
            state = encode_state(MachineState(board.vm_state(), board.vcpu_states(), board.devices.state()))
            with open_save_target(uri) as out:
                writer = StreamWriter(out)
                writer.write_header()
                writer.write_section(SectionKind.CONFIG, identity)
                writer.write_section(SectionKind.STATE, state)
                writer.write_memory([(r.gpa, machine.memory.buffer(r.gpa, r.size)) for r in machine.memory.ranges],
                                    extents=_ram_extents(machine.memory))
                writer.finish()
        except BaseException:
            machine.emit("MIGRATION", {"status": "failed"})
            if was_running:
                machine.board.resume()
                machine.emit("RESUME")
            raise
        done = time.monotonic()
        machine._set_status(RunState.POSTMIGRATE)
        stats = {"status": "completed", "total-time": int((done - started) * 1000),
                 "downtime": int((done - paused_at) * 1000), "setup-time": 0,
                 "ram": {"transferred": writer.page_bytes_written, "total": machine.memory.size,
                         "remaining": 0}, "stream-bytes": writer.bytes_written}
        machine.last_migration = stats
        machine.emit("MIGRATION", {"status": "completed"})
        log.info("saved to %s: %d bytes of RAM pages in %.0f ms", uri, writer.page_bytes_written,
                 (done - started) * 1000)
        return stats


def _ram_extents(memory: GuestMemory) -> dict[int, Any] | None:
    """Where guest RAM may hold data, by range gpa: the only bytes a save or a migration's first
    pass scans for non-zero pages. memfd: its data extents (scanning a shmem hole would allocate
    it: no shared zero page for shmem, the host would grow by all of guest RAM). Anonymous RAM:
    the pages it has at all (/proc/self/pagemap; an untouched page is zero, and scanning all of
    a mostly untouched guest was most of a first pass under nested TCG). Otherwise None: scan."""
    from kvmpy.migrate.pages import data_extents, populated_extents
    if memory.backend == "memfd" and memory.fd >= 0:
        return {r.gpa: data_extents(memory.fd, r.offset, r.size) for r in memory.ranges}
    if memory.backend == "anon":
        return {r.gpa: populated_extents(memory.host_address(i), r.size) for i, r in enumerate(memory.ranges)}
    return None


def _flush_disks(machine: "Machine") -> None:
    """Pause flushes the disks (the destination reopens the same images)."""
    for entry in machine.board.devices:
        backend = getattr(entry.device, "device", None)
        flush = getattr(backend, "flush", None)
        if callable(flush):
            flush()


# -- restoring ----------------------------------------------------------------------------------
def restore_machine(machine: "Machine", uri: str) -> None:
    """Build `machine` (in inmigrate, from its own config) and load the stream at `uri` into it;
    runs it unless its config says paused. Any failure leaves no vCPU running and raises.
    tcp:/unix: wait for a live migration (kvmpy.migrate.live, imported when called)."""
    if parse_uri(uri).scheme in ("tcp", "unix"):
        from kvmpy.migrate.live import incoming_live
        incoming_live(machine, uri)
        return
    with machine._lock:
        if machine.run_state is not RunState.INMIGRATE or machine.board is not None:
            raise StateError(f"restoring from {uri}", detail=f"the machine is {machine.status}, not inmigrate")
        started = time.monotonic()
        machine.emit("MIGRATION", {"status": "active"})
        try:
            with open_restore_source(uri) as src:
                _load(machine, src)
        except BaseException:
            machine.emit("MIGRATION", {"status": "failed"})
            if machine.board is not None:
                machine.board.close()
                machine.board = None
            raise
        machine._start_supervisor()
        machine.board.start(paused=True)
        machine._set_status(RunState.PAUSED)
        machine.emit("MIGRATION", {"status": "completed"})
        if not machine.config.paused:   # QEMU's autostart, under the lock a QMP `stop` takes
            machine.resume()
    log.info("restored from %s in %.1f ms (stream start to the vCPUs %s)", uri,
             (time.monotonic() - started) * 1000, "parked" if machine.config.paused else "entering KVM_RUN")


def _pairs(value: object) -> list | None:
    """A hostile identity's ram_ranges as [[gpa, size], ...], or None when it is not that shape."""
    if not isinstance(value, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        return None
    return [list(p) for p in value]


def _load(machine: "Machine", src: Any) -> None:
    reader = StreamReader(src)
    section = reader.next_section()
    if section is None or section.kind is not SectionKind.CONFIG:
        raise MigrationError("reading the snapshot", detail="it does not start with the machine's identity")
    identity = decode_state(section.payload)
    check_sizes(identity, machine.config.memory, machine.config.smp)
    section = reader.next_section()
    if section is None or section.kind is not SectionKind.STATE:
        raise MigrationError("reading the snapshot", detail="the machine state is missing")
    # Decoded once the Board is built: building it imports the configured devices' modules, whose
    # state classes the decoder must know (start-up imports only what the configuration uses).
    state_payload = section.payload
    section = reader.next_section()
    if section is None or section.kind not in (SectionKind.MEMORY_FILE, SectionKind.MEMORY_RUNS):
        raise MigrationError("reading the snapshot", detail="guest memory is missing")
    cfg = machine.config
    layout = [(r.gpa, r.size) for r in ram_ranges(cfg.memory)]
    if _pairs(identity.ram_ranges) != [list(x) for x in layout]:
        raise MigrationError("the snapshot does not fit this machine", detail="its RAM layout differs")
    if section.kind is SectionKind.MEMORY_FILE and reader.mappable:
        check_file_ranges(section.file_ranges, layout)
        machine.memory = GuestMemory.map_file(cfg.memory, src.fileno(),
                                              {r.gpa: r.file_offset for r in section.file_ranges})
        section = reader.next_section()
    else:
        machine.memory = GuestMemory.create(cfg.memory, cfg.mem_backend)
        targets = [(r.gpa, machine.memory.buffer(r.gpa, r.size)) for r in machine.memory.ranges]
        while section is not None and section.kind in (SectionKind.MEMORY_FILE, SectionKind.MEMORY_RUNS):
            reader.read_memory_into(section, targets)
            section = reader.next_section()
    if section is not None:
        raise MigrationError("reading the snapshot", detail=f"an unexpected {section.kind.name} section after memory")
    # Build the devices (no kernel, no vCPUs yet), check the snapshot against them, then the vCPUs.
    from kvmpy.machine.board import Board
    machine.boots += 1
    machine.board = Board(machine.kvm, cfg, machine.memory, machine._hooks(), machine.hvc_console, load=False,
                          taps=machine.taps)
    machine._apply_port_hooks()
    check_identity(identity, machine, _host_cpuid(machine))
    state = decode_state(state_payload)
    if not isinstance(state, MachineState) or not isinstance(state.vcpus, list) or \
            not all(isinstance(v, VcpuState) for v in state.vcpus):
        raise MigrationError("reading the snapshot", detail="the machine state is malformed")
    machine.board.create_vcpus(None, [[tuple(e) for e in t] for t in identity.cpuid])
    try:
        machine.board.restore(state.vm, state.vcpus, state.devices)
    except KvmpyError as e:
        raise MigrationError("restoring the snapshot", detail=str(e)) from None
    machine._open_consoles()    # outputs last: a refused or broken snapshot truncates no log
