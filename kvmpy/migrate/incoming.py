"""Live migration, the destination's side (`--incoming tcp:`/`unix:`, QMP migrate-incoming):
prepare the board, accept the source (kvmpy.migrate.live.accept_one), check its identity and
answer ACCEPT or REFUSE, receive RAM (and with `block` the disks) and the state, answer LOADED,
and start the guest only on the source's GO. Anything else closes the half-built board and
raises: the source, which resumes on any failure before LOADED, keeps the only running copy.
Apart from kvmpy.migrate.live (the source's side and the connections), which calls it."""
from __future__ import annotations

import errno
import logging
import socket
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING

from kvmpy.errors import KvmpyError, MigrationError, StateError
from kvmpy.machine.runstate import RunState
from kvmpy.machine.snapshot import MachineState, _host_cpuid, check_identity, check_sizes
from kvmpy.memslots import GuestMemory
from kvmpy.migrate import decoder
from kvmpy.migrate.decoder import decode_state
from kvmpy.migrate.downtime import collector_paused
from kvmpy.migrate.live import ACCEPT_TIMEOUT_S, DISK_LOCK_TIMEOUT_S, _disks, _drives, accept_one
from kvmpy.migrate.precopy import (ACCEPT, FAILED, GO, LOADED, OFFER_SYNC, REFUSE, REPLY_TIMEOUT_S, SYNCED,
                                   receive_memory_and_state)
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import SectionKind
from kvmpy.migrate.uri import parse_uri
from kvmpy.vcpu.state import VcpuState

if TYPE_CHECKING:
    from kvmpy.machine.lifecycle import Machine

log = logging.getLogger(__name__)


def incoming_live(machine: "Machine", uri: str, accept_timeout_s: float = ACCEPT_TIMEOUT_S) -> None:
    """--incoming tcp:/unix:: accept the source, load the guest, start it on GO (paused with -S)."""
    target = parse_uri(uri)
    with machine._lock:
        if machine.run_state is not RunState.INMIGRATE or machine.board is not None:
            raise StateError(f"incoming migration on {uri}", detail=f"the machine is {machine.status}, not inmigrate")
    sock = None
    try:
        with machine._lock:
            _prepare(machine)
        sock = accept_one(target, accept_timeout_s)
        machine.emit("MIGRATION", {"status": "active"})
        started, cpu_at = time.monotonic(), time.process_time()
        with machine._lock:
            loaded_at, go_at = _receive(machine, sock)
            cpu_s = time.process_time() - cpu_at
            machine._set_status(RunState.PAUSED)
            machine.emit("MIGRATION", {"status": "completed"})
            # QEMU's autostart, decided under the lock a QMP `stop` takes: a stop sent during the
            # load waited for it and would otherwise find the guest paused, do nothing, and be lost
            if not machine.config.paused:
                machine.resume()
    except BaseException:
        if sock is not None:
            machine.emit("MIGRATION", {"status": "failed"})
        with machine._lock:
            if machine.board is not None:
                machine.board.close()
                machine.board = None
        raise
    finally:
        if sock is not None:
            sock.close()
    running_at = time.monotonic()
    # after the guest runs, as a normal start does: a thread's start cost 10-37 ms of the
    # downtime in L1, and an end or reset requested meanwhile waits in the machine's flags
    machine._start_supervisor()
    log.info("incoming migration done in %.0f ms from the source's connection (this process's CPU %.0f ms "
             "until loaded); the guest started %.0f ms after it was loaded (the source's go-ahead %.0f, "
             "resume %.0f)", (running_at - started) * 1000, cpu_s * 1000,
             (running_at - loaded_at) * 1000, (go_at - loaded_at) * 1000, (running_at - go_at) * 1000)


class _StateLoad:
    """The machine state, decoded and restored as soon as STATE arrives: the source sends it
    before the switchover's last pages, which then travel meanwhile (the restore reads no guest
    RAM). A failure is kept for after the stream's end, where the source reads FAILED <why>."""

    def __init__(self, machine: "Machine"):
        self.machine = machine
        self.error: KvmpyError | None = None
        self.decode_ms = self.restore_ms = 0.0

    def load(self, payload: bytes, downtime: ExitStack) -> None:
        downtime.enter_context(collector_paused())      # no garbage collection until LOADED
        started = time.monotonic()
        try:
            state = decode_state(payload)
            if not isinstance(state, MachineState) or not isinstance(state.vcpus, list) or \
                    not all(isinstance(v, VcpuState) for v in state.vcpus):
                raise MigrationError("reading the migration stream", detail="the machine state is malformed")
            decoded = time.monotonic()
            self.machine.board.restore(state.vm, state.vcpus, state.devices)
            self.decode_ms, self.restore_ms = (decoded - started) * 1000, (time.monotonic() - decoded) * 1000
        except KvmpyError as exc:
            self.error = exc


def _prepare(machine: "Machine") -> None:
    """The RAM and the board (no vCPUs: they take the source's CPUID) before the source connects,
    as QEMU's destination is built before it listens: the source's setup time is then the
    identity check and the vCPUs, not the building of every device (seconds under nested TCG)."""
    cfg = machine.config
    machine.memory = GuestMemory.create(cfg.memory, cfg.mem_backend)
    from kvmpy.devices.virtio.imagelock import lock_handover
    from kvmpy.machine.board import Board
    machine.boots += 1
    with lock_handover():       # the source holds the disks' locks until it hands them over
        machine.board = Board(machine.kvm, cfg, machine.memory, machine._hooks(), machine.hvc_console,
                              load=False, taps=machine.taps)
    machine._apply_port_hooks()


def _reply(sock: socket.socket, word: bytes, text: str = "") -> None:
    line = word + (b" " + text.encode("ascii", errors="replace")[:500] if text else b"") + b"\n"
    try:
        sock.sendall(line)
    except OSError as exc:
        gone = exc.errno in (errno.EPIPE, errno.ECONNRESET)
        raise MigrationError("answering the source", errno=exc.errno,
                             detail="the source closed the connection (it cancelled or failed, and keeps "
                                    "the guest)" if gone else "") from None


def _receive(machine: "Machine", sock: socket.socket) -> tuple[float, float]:
    """The stream into the prepared board; when LOADED went out and when GO came in (time.monotonic)."""
    sock.settimeout(REPLY_TIMEOUT_S)
    stream = sock.makefile("rb")
    reader = StreamReader(stream)
    section = reader.next_section()
    if section is None or section.kind is not SectionKind.CONFIG:
        raise MigrationError("reading the migration stream", detail="it does not start with the machine's identity")
    cfg = machine.config
    try:
        if machine.board is None or machine.run_state.ended:    # e.g. its --timeout while it listened
            end = getattr(machine, "_end", None)
            raise StateError("incoming migration", detail=f"the destination ended ({end.reason if end else machine.status}) "
                                                          "before the source connected")
        identity = decode_state(section.payload)
        check_sizes(identity, cfg.memory, cfg.smp)
        machine._open_consoles()
        check_identity(identity, machine, _host_cpuid(machine))
        # the vCPUs now (with the source's CPUID), not in the downtime after STATE
        machine.board.create_vcpus(None, [[tuple(e) for e in t] for t in identity.cpuid])
        decoder.prepare_classes()     # the state classes' tables now, not in the downtime
    except KvmpyError as exc:
        _reply(sock, REFUSE, str(exc))
        raise
    _reply(sock, ACCEPT, OFFER_SYNC)
    # The vCPU and I/O threads now, parked and held (a paused board, as the source's), while the
    # source starts its first pass: the restore finds them there, and the downtime no longer
    # holds their start (64 of the 76 ms from LOADED to a running guest in L1). A parked vCPU is
    # outside KVM_RUN and has never entered the guest (immediate_exit), so its state, CPUID
    # included, is still set as on a new one. A failure here ends the connection: the source
    # resumes its guest.
    from kvmpy.machine.board import PARK_TIMEOUT_S
    machine.board.start(paused=True)
    if not machine.board.loop.quiesce(PARK_TIMEOUT_S):
        raise MigrationError("incoming migration", detail="the I/O loop did not settle")
    from kvmpy.migrate.block import BlockReceiver
    blocks = BlockReceiver(_drives(machine), lambda word, text: _reply(sock, word, text), ACCEPT, REFUSE)
    targets = [(r.gpa, machine.memory.buffer(r.gpa, r.size)) for r in machine.memory.ranges]
    loading = _StateLoad(machine)
    with ExitStack() as downtime:   # from STATE (the paused source's first section) to LOADED
        receive_memory_and_state(reader, targets, blocks.handle, lambda: _reply(sock, SYNCED),
                                 on_state=lambda payload: loading.load(payload, downtime))
        end_at = time.monotonic()
        try:
            blocks.finish()
            if loading.error is not None:
                raise loading.error
        except KvmpyError as exc:
            _reply(sock, FAILED, str(exc))
            raise MigrationError("loading the migrated guest", detail=str(exc)) from None
        _reply(sock, LOADED)
    loaded_at = time.monotonic()
    log.info("incoming: the state decoded in %.0f ms and restored in %.0f ms as it arrived; loaded %.0f ms "
             "after the stream's end", loading.decode_ms, loading.restore_ms, (loaded_at - end_at) * 1000)
    try:
        line = stream.readline(64)
    except OSError as exc:
        raise MigrationError("waiting for the source's go-ahead", errno=exc.errno,
                             detail="the source did not confirm the switchover (it keeps the guest)") from None
    if line.rstrip(b"\n") != GO:
        raise MigrationError("waiting for the source's go-ahead",
                             detail="the source did not confirm the switchover (it keeps the guest)")
    go_at = time.monotonic()
    for disk in _disks(machine.board):      # the source let them go before GO
        disk.take_lock(DISK_LOCK_TIMEOUT_S)
    return loaded_at, go_at
