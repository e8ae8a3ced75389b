"""One built instance of a machine: the VM with its in-kernel irqchip and PIT, RAM mapped into
it, the buses and the device table, the I/O event loop and the vCPU threads.

A guest reboot throws a Board away and builds a new one over the *same* GuestMemory and consoles,
so the objects an API user holds (memory views, the console) stay valid (Machine emits RESET).
A Board is also what a restore builds, without loading a kernel, before the snapshot's state is
applied to it. Lifecycle policy (run states, events, saving) lives in kvmpy.machine.lifecycle.
"""
from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, TextIO

from kvmpy.boot import load_kernel
from kvmpy.boot.cpuid import CpuidEntry, guest_cpuid
from kvmpy.boot.entry import apply_entry
from kvmpy.boot.msrs import boot_msrs
from kvmpy.devices.bus import Bus, CountingBus
from kvmpy.errors import IoctlError, KvmpyError, StateError
from kvmpy.eventloop import EventLoop
from kvmpy.ioctl import Kvm
from kvmpy.ioctl._kvm import ffi, lib
from kvmpy.machine.config import MachineConfig
from kvmpy.machine.devices import DeviceTable
from kvmpy.machine.interrupts import MsiRouter
from kvmpy.machine.platform import add_legacy_devices, add_virtio_devices, write_firmware_tables
from kvmpy.machine.vmstate import ClockKeeper, VmState, capture_vm, restore_vm
from kvmpy.memslots import GuestMemory
from kvmpy.vcpu.report import machine_report, python_stacks
from kvmpy.vcpu.runner import StopReason, VcpuThread
from kvmpy.vcpu.state import VcpuState, get_vcpu_state, set_vcpu_state

if TYPE_CHECKING:
    from kvmpy.devices.console import Console
    from kvmpy.machine.virtio import VirtioPciWiring

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
PCI_CONFIG_PORT = 0xCF8
PAGE_SIZE = mmap.PAGESIZE
LAPIC_LVT0, LAPIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7, 0x4
PARK_TIMEOUT_S = 5.0

CpuidTable = list[tuple[int, int, int, int, int, int, int]]   # (function, index, flags, eax..edx)


@dataclass
class BoardHooks:
    """What devices and vCPU threads tell the machine. Called on vCPU or event-loop threads."""
    reset: Callable[[], None]                     # the guest asked for a reset
    poweroff: Callable[[], None]                  # ACPI S5
    debug_exit: Callable[[int], None]             # port 0x501
    vcpu_stopped: Callable[[VcpuThread, StopReason], bool]
    serial_out: Callable[[bytes], None]           # COM1 output (through the panic watch)


class Board:
    def __init__(self, kvm: Kvm, config: MachineConfig, memory: GuestMemory, hooks: BoardHooks,
                 hvc_console: "Console | None", load: bool = True, cpuid: list[CpuidTable] | None = None,
                 taps: dict | None = None):
        """Build everything. `load=False` (a restore) skips the kernel, the firmware tables and
        the vCPUs: guest RAM and vCPU state come from the snapshot, and create_vcpus() is called
        with the CPUID each vCPU had on the source instead of this host's."""
        self.config, self.memory, self.hooks = config, memory, hooks
        self.taps = taps                    # the machine's, kept across reboots (platform._nics)
        self.vcpu_threads: list[VcpuThread] = []
        self.wiring: VirtioPciWiring | None = None
        self.loop: EventLoop | None = None
        self.router: MsiRouter | None = None
        self.cpuid: list[CpuidTable] = []
        self.devices = DeviceTable()
        self.vm = kvm.create_vm()
        try:
            self._build(kvm, hvc_console, load, cpuid)
        except BaseException:
            self.close()
            raise
        self.clock = ClockKeeper(self.vm)

    def _build(self, kvm: Kvm, hvc_console: "Console | None", load: bool, cpuid: list[CpuidTable] | None) -> None:
        cfg, vm, mem = self.config, self.vm, self.memory
        vm.set_tss_addr(TSS_ADDR)
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)
        for i, r in enumerate(mem.ranges):
            vm.set_user_memory_region(r.slot, r.gpa, r.size, mem.host_address(i))
        bus = CountingBus if cfg.stats else Bus
        self.pio, self.mmio = bus("pio", 0x10000), bus("mmio", 1 << 52)
        self.loop = EventLoop()
        self.router = MsiRouter(vm)
        legacy = add_legacy_devices(self, vm, mem)
        self.rtc, self.acpi_pm = legacy.rtc, legacy.acpi_pm
        self.pci, self.wiring, pci_irqs = add_virtio_devices(self, vm, mem, hvc_console)
        self._fastpio = ffi.new("struct kvmpy_fastpio *")
        self.pci.attach_latch(self._fastpio)
        for devfn in self.pci.present_devfns():
            self._fastpio.pci_present[devfn >> 5] |= 1 << (devfn & 31)
        self._kvm = kvm
        if load:
            entry = load_kernel(mem, cfg.kernel, cfg.cmdline, cfg.initrd)
            write_firmware_tables(mem, cfg, pci_irqs, self.acpi_pm)
            self.create_vcpus(entry, cpuid)

    def create_vcpus(self, entry, cpuid: list[CpuidTable] | None) -> None:
        """The vCPUs, last: a restore builds the devices, checks the snapshot against them, and
        only then creates vCPUs with the snapshot's CPUID (`entry` None: no boot registers)."""
        self._create_vcpus(self._kvm, entry, cpuid)
        if not self.config.stats:
            self._coalesce_pci_latch()
        self.loop.call_later(0.5, self._poll_rtc)

    # -- vCPUs --------------------------------------------------------------------------------
    def _create_vcpus(self, kvm: Kvm, entry, cpuid: list[CpuidTable] | None) -> None:
        cfg = self.config
        if cpuid is None:
            host = kvm.supported_cpuid()
            host_entries = [host.entries[i] for i in range(host.nent)]
            tsc_deadline = cfg.tsc_deadline and bool(self.vm.check_extension(lib.KVM_CAP_TSC_DEADLINE_TIMER))
            cpuid = [[_cpuid_tuple(e) for e in guest_cpuid(host_entries, i, cfg.smp, tsc_deadline)]
                     for i in range(cfg.smp)]
        elif len(cpuid) != cfg.smp:
            raise StateError("restoring vCPUs", detail=f"the snapshot has CPUID for {len(cpuid)} vCPUs, "
                                                      f"this machine has {cfg.smp}")
        self.cpuid = cpuid
        for i in range(cfg.smp):
            vcpu = self.vm.create_vcpu(i)
            vcpu.set_cpuid2([ffi.new("struct kvm_cpuid_entry2 *", _cpuid_dict(t)) for t in cpuid[i]])
            vcpu.set_msrs(boot_msrs())
            _set_lapic_lints(vcpu)
            if i == 0 and entry is not None:
                regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
                apply_entry(regs, sregs, entry)
                vcpu.set_sregs(sregs)
                vcpu.set_regs(regs)
                fpu = vcpu.get_fpu()
                fpu.fcw = 0x37F
                fpu.mxcsr = 0x1F80
                vcpu.set_fpu(fpu)
            self.vcpu_threads.append(VcpuThread(vcpu, self.pio, self.mmio, on_stop=self.hooks.vcpu_stopped,
                                                fastpio=None if cfg.stats else self._fastpio))

    def _coalesce_pci_latch(self) -> None:
        """Let guest writes of the 0xCF8 latch skip the exit: KVM queues them in the VM's coalesced
        ring and kvmpy_run_fast drains it at the next exit (see _build.py). Half the exits of
        every config-space access; skipped where KVM lacks KVM_CAP_COALESCED_PIO."""
        vm, vcpu = self.vm, self.vcpu_threads[0].vcpu
        page = lib.KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE
        if not vm.check_extension(lib.KVM_CAP_COALESCED_PIO) or page + PAGE_SIZE > vcpu.mmap_size:
            return
        vm.coalesced_io(PCI_CONFIG_PORT, 4, pio=True)
        f = self._fastpio
        f.ring_max = (PAGE_SIZE - ffi.sizeof("struct kvm_coalesced_mmio_ring")) \
            // ffi.sizeof("struct kvm_coalesced_mmio")
        f.ring = ffi.cast("char *", vcpu.run_struct) + page  # vCPU 0's mapping lives as long as the VM
        self.pci.attach_latch(f, sync=lambda: lib.kvmpy_fastpio_drain(f))

    def _poll_rtc(self) -> None:
        """Drive the RTC's update/alarm/periodic interrupts on the event-loop thread."""
        loop = self.loop
        if loop is None:
            return
        self.rtc.poll()
        loop.call_later(self.rtc.poll_interval() or 0.5, self._poll_rtc)

    def stop_current_vcpu(self) -> None:
        """Called from a device on a vCPU thread: leave KVM_RUN before the next guest instruction."""
        for t in self.vcpu_threads:
            if t.is_current():
                t.request_exit(0, "stopped by a device")

    # -- running and parking ------------------------------------------------------------------
    def start(self, paused: bool) -> None:
        self.loop.start()
        for t in self.vcpu_threads:
            t.start(paused=paused)
        if paused:
            self.clock.freeze()
            self._wait_parked()

    def pause(self) -> None:
        """Park every vCPU, finish what the guest queued on its virtqueues, hold the I/O loop, and
        tell the guest through kvmclock that it was stopped."""
        for t in self.vcpu_threads:
            t.request_pause()
        self._wait_parked()
        if self.wiring is not None:
            self.loop.call_soon_threadsafe(self.wiring.poll_all_queues)
        if not self.loop.quiesce(PARK_TIMEOUT_S):
            raise KvmpyError("pausing the machine", detail=f"the I/O loop did not settle within {PARK_TIMEOUT_S:g} s")
        for backend in self._kernel_offloaded():   # vhost moves packets without the vCPUs:
            backend.quiesce()                       # take its rings back (indices into the queues)
        for t in self.vcpu_threads:
            try:
                t.vcpu.kvmclock_ctrl()
            except IoctlError:
                pass   # EINVAL: the guest has no kvmclock page (yet); nothing to tell it
        self.clock.freeze()

    def _wait_parked(self) -> None:
        stuck = [t.vcpu.id for t in self.vcpu_threads if not t.wait_parked(PARK_TIMEOUT_S)]
        if stuck:
            raise KvmpyError("pausing the machine", detail=f"vCPU {', '.join(map(str, stuck))} did not "
                                                           f"leave KVM_RUN within {PARK_TIMEOUT_S:g} s")

    def _kernel_offloaded(self) -> list:
        """Backends whose queues the kernel may run (vhost): they have quiesce()/resume()."""
        if self.wiring is None:
            return []
        return [d.device for d in self.wiring.devices if hasattr(d.device, "quiesce")]

    def resume(self) -> None:
        self.clock.thaw()
        for backend in self._kernel_offloaded():
            backend.resume()
        self.loop.release()
        if self.wiring is not None:   # requests queued while parked, or restored with the rings
            self.loop.call_soon_threadsafe(self.wiring.poll_all_queues)
        for t in self.vcpu_threads:
            t.resume()

    # -- state (the board must be parked) --------------------------------------------------------
    def vm_state(self) -> VmState:
        return capture_vm(self.vm, clock_ns=self.clock.frozen_ns)

    def vcpu_states(self) -> list[VcpuState]:
        indices = self.vm.kvm.msr_index_list()
        return [get_vcpu_state(t.vcpu, indices) for t in self.vcpu_threads]

    def restore(self, vm_state: VmState, vcpus: list[VcpuState], devices: dict) -> None:
        """Apply a snapshot's state to this freshly built (not yet started) board."""
        if not isinstance(vcpus, list) or len(vcpus) != len(self.vcpu_threads):
            raise StateError("restoring vCPUs", detail=f"the snapshot has {len(vcpus) if isinstance(vcpus, list) else '?'} "
                                                      f"vCPU states, this machine has {len(self.vcpu_threads)} vCPUs")
        for t, s in zip(self.vcpu_threads, vcpus):   # everything validated before the first vCPU changes
            if not isinstance(s, VcpuState):
                raise StateError("restoring vCPUs", detail=f"expected VcpuState, got {type(s).__name__}")
            s.validate(xsave_bytes=t.vcpu.xsave_bytes)
        self.devices.restore(devices)
        if self.wiring is not None:
            self.wiring.rewire_all()
        restore_vm(self.vm, vm_state)
        for t, s in zip(self.vcpu_threads, vcpus):
            set_vcpu_state(t.vcpu, s, validated=True)
        self.clock.frozen_ns = vm_state.clock_ns   # put back when the vCPUs first run

    # -- reports ------------------------------------------------------------------------------
    def write_report(self, out: TextIO, boots: int) -> None:
        """What every vCPU and interrupt controller is doing, and each thread's Python stack:
        for a guest that hangs without a word on its console (SIGUSR2 asks for it)."""
        out.write(f"kvmpy: state report, boot {boots}: Python stacks as they were\n" + python_stacks())
        out.flush()
        lines = ["kvmpy: vCPUs and interrupt controllers"]
        lines += machine_report(self.vcpu_threads, self.vm, self.memory.read)
        lines.append(f"exits answered in C so far: {self._fastpio.fast_exits}")
        out.write("\n".join(lines) + "\n")
        out.flush()

    def stats_report(self) -> str:
        """Exit counts per address, most frequent first (only with config.stats)."""
        lines = []
        for bus in (self.pio, self.mmio):
            if isinstance(bus, CountingBus):
                lines.append(f"{bus.name}: {sum(bus.counts.values())} accesses")
                lines += [f"  {k} {a:#x} {c} {d}" for k, a, c, d in bus.top(15)]
        return "\n".join(lines)

    def close(self) -> None:
        """Stop the vCPUs and the loop, close every fd. The memory and consoles are not ours."""
        for t in self.vcpu_threads:
            t.resume()
            t.stop(timeout=PARK_TIMEOUT_S)
        if self.vcpu_threads and not self.config.stats:
            f = self._fastpio
            log.info("exit fast path: %d exits answered in C, %d 0xCF8 writes taken from the "
                     "coalesced ring", f.fast_exits, f.coalesced)
        self.vcpu_threads = []
        if self.loop is not None:
            self.loop.stop()
        if self.wiring is not None:
            self.wiring.close()
            self.wiring = None
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        if self.router is not None:
            self.router.close()
            self.router = None
        if self.vm is not None:
            self.vm.close()
            self.vm = None


def _cpuid_tuple(e: CpuidEntry) -> tuple[int, int, int, int, int, int, int]:
    return (e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)


def _cpuid_dict(t: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(("function", "index", "flags", "eax", "ebx", "ecx", "edx"), t))


def _set_lapic_lints(vcpu) -> None:
    """LINT0 = ExtINT (the PIC, virtual-wire mode), LINT1 = NMI, as the MP table says."""
    lapic = vcpu.get_lapic()
    buf = ffi.buffer(lapic.regs)
    for off, mode in ((LAPIC_LVT0, APIC_MODE_EXTINT), (LAPIC_LVT1, APIC_MODE_NMI)):
        v = int.from_bytes(buf[off:off + 4], "little")
        v = (v & ~0x700 & ~0x10000) | (mode << 8)
        buf[off:off + 4] = v.to_bytes(4, "little")
    vcpu.set_lapic(lapic)
