"""The only composer: builds the VM, RAM, buses, devices and vCPUs from a MachineConfig, runs
the guest until it ends, and turns how it ended into an exit status.

Devices never see the VM: they get an offset, data, a guest-memory view and interrupt lines
made here (kvmpy.interrupts). A reboot rebuilds everything but the consoles (QEMU-like), unless
--no-reboot asks kvmpy to exit instead.
"""
from __future__ import annotations

import logging
import mmap
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from kvmpy.boot import load_kernel
from kvmpy.boot.acpi import AcpiPlatform, AcpiPmPorts, write_acpi_tables
from kvmpy.boot.cpuid import guest_cpuid
from kvmpy.boot.entry import apply_entry
from kvmpy.boot.mptable import PciInterrupt, write_mptable
from kvmpy.boot.msrs import boot_msrs
from kvmpy.devices.acpi_pm import (PM1_CNT_OFFSET, PM1_STS_OFFSET, PM_BASE_PORT, PM_BLOCK_LENGTH,
                                   PM_TMR_OFFSET, RESET_OFFSET, AcpiPm)
from kvmpy.devices.bus import Bus, CountingBus
from kvmpy.devices.console import Console, open_console
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORT, DebugExit
from kvmpy.devices.i8042 import I8042
from kvmpy.devices.legacy import FastA20Port, PostCodePort, probe_sinks
from kvmpy.devices.pci.host import BAR_WINDOW_END, BAR_WINDOW_START, PciRoot
from kvmpy.devices.rtc import CmosRtc
from kvmpy.devices.serial import REGISTER_WINDOW, Serial16550
from kvmpy.eventloop import EventLoop
from kvmpy.interrupts import KvmIrqLine, MsiRouter
from kvmpy.ioctl import Kvm
from kvmpy.ioctl._kvm import ffi, lib
from kvmpy.memslots import GuestMemory
from kvmpy.panicwatch import PanicWatch
from kvmpy.vcpu.report import machine_report, python_stacks
from kvmpy.vcpu.runner import StopKind, StopReason, VcpuThread, install_kick_signal
from kvmpy.vmconfig import MachineConfig

if TYPE_CHECKING:
    from kvmpy.virtiowiring import VirtioPciWiring

log = logging.getLogger(__name__)

TSS_ADDR = 0xFFFB_D000
IDENTITY_MAP_ADDR = 0xFFFB_C000
COM1_PORT, COM1_IRQ = 0x3F8, 4
PCI_CONFIG_PORT = 0xCF8
PAGE_SIZE = mmap.PAGESIZE
LAPIC_LVT0, LAPIC_LVT1 = 0x350, 0x360
APIC_MODE_EXTINT, APIC_MODE_NMI = 0x7, 0x4
REPORT_SIGNAL = signal.SIGUSR2  # `kill -USR2 <pid>`: write_report() to stderr


@dataclass(frozen=True)
class MachineExit:
    """How a run ended: the process exit status and one line saying why."""
    status: int
    reason: str


class Machine:
    """One guest. `run()` boots it and returns a MachineExit; `close()` frees everything."""

    def __init__(self, config: MachineConfig, serial: Console | None = None,
                 virtio_console: Console | None = None):
        config.validate()
        self.config = config
        self.serial_console = serial if serial is not None else open_console(config.serial)
        self.hvc_console = virtio_console
        if self.hvc_console is None and config.virtio_console:
            self.hvc_console = open_console(config.virtio_console)
        self.panic = PanicWatch(self.serial_console.write)
        self.kvm = Kvm(config.device)
        self._host_cpuid = self.kvm.supported_cpuid()
        self._done = threading.Event()
        self._end: MachineExit | None = None
        self._end_lock = threading.Lock()
        self._reset_requested = False
        self._report_requested = False
        self.vm = None
        self.memory: GuestMemory | None = None
        self.loop: EventLoop | None = None
        self.router: MsiRouter | None = None
        self.vcpu_threads: list[VcpuThread] = []
        self.wiring: VirtioPciWiring | None = None   # only when virtio devices are configured
        self.boots = 0

    # -- ending ------------------------------------------------------------------------------
    def finish(self, status: int, reason: str) -> None:
        """Record how the guest ended (first caller wins) and wake the main thread."""
        with self._end_lock:
            if self._end is None:
                self._end = MachineExit(status, reason)
        self._done.set()

    def request_reset(self) -> None:
        """Guest asked for a reset (i8042, port 0x92, triple fault under --no-reboot=off)."""
        if self.config.no_reboot or self.panic.line is not None:
            self._finish_reboot()
        else:
            with self._end_lock:
                self._reset_requested = True
            self._done.set()
        self._stop_current_vcpu()

    def _finish_reboot(self) -> None:
        if self.panic.line is not None:
            self.finish(2, f"guest kernel panic: {self.panic.line}")
        else:
            self.finish(0, "guest rebooted (--no-reboot)")

    def _on_vcpu_stop(self, thread: VcpuThread, reason: StopReason) -> bool:
        kind = reason.kind
        if kind == StopKind.RESET:
            self.request_reset()
        elif kind == StopKind.POWEROFF:
            self.finish(0, "guest powered off")
        elif kind == StopKind.SHUTDOWN:
            if self.panic.line is not None:
                self.finish(2, f"guest kernel panic: {self.panic.line}")
            else:
                self.finish(3, f"guest triple fault on vCPU {thread.vcpu.id}"
                               + (f": {reason.detail}" if reason.detail else ""))
        elif kind == StopKind.CRASH:
            self.finish(2, f"guest reported a crash: {reason.detail}")
        elif kind == StopKind.EXIT_CODE:
            self.finish(reason.exit_code or 0, reason.detail)
        elif kind == StopKind.STOPPED:
            pass
        elif kind == StopKind.HALTED:
            # Without a pending interrupt source a halted uniprocessor never wakes: say so.
            self.finish(0, f"vCPU {thread.vcpu.id} halted")
        else:
            self.finish(4, f"vCPU {thread.vcpu.id} failed: {reason.detail}")
        return False

    # -- building ----------------------------------------------------------------------------
    def _build(self) -> None:
        cfg = self.config
        vm = self.vm = self.kvm.create_vm()
        vm.set_tss_addr(TSS_ADDR)
        vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        vm.create_irqchip()
        vm.create_pit2(lib.KVM_PIT_SPEAKER_DUMMY)
        mem = self.memory = GuestMemory.create(cfg.memory, cfg.mem_backend)
        log.info("guest RAM: %d MiB, %s backing", cfg.memory >> 20, mem.backend)
        for i, r in enumerate(mem.ranges):
            vm.set_user_memory_region(r.slot, r.gpa, r.size, mem.host_address(i))
        bus = CountingBus if cfg.stats else Bus
        self.pio = bus("pio", 0x10000)
        self.mmio = bus("mmio", 1 << 52)
        self.loop = EventLoop()
        self.router = MsiRouter(vm)
        self._add_legacy_devices(vm, mem)
        pci_irqs = self._add_pci_devices(vm, mem)
        self._fastpio = ffi.new("struct kvmpy_fastpio *")
        self.pci.attach_latch(self._fastpio)
        for devfn in self.pci.present_devfns():
            self._fastpio.pci_present[devfn >> 5] |= 1 << (devfn & 31)
        entry = load_kernel(mem, cfg.kernel, cfg.cmdline, cfg.initrd)
        # KVM routes the in-kernel PIT to IOAPIC pin 0 (identity GSI routing), so say so.
        write_mptable(mem, cfg.smp, pci_irqs, isa_irq0_pin=0)
        if cfg.acpi:
            self._add_acpi(mem, pci_irqs)
        self._create_vcpus(entry)
        if not cfg.stats:
            self._coalesce_pci_latch()
        self.loop.call_later(0.5, self._poll_rtc)

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

    def _add_legacy_devices(self, vm, mem: GuestMemory) -> None:
        self.serial = Serial16550(KvmIrqLine(vm, COM1_IRQ), self.panic.write, name="com1")
        self.pio.register(COM1_PORT, REGISTER_WINDOW, self.serial)
        # The mouse (AUX) interrupt is deliberately left unwired: with IRQ 12 wired, Linux's AUX
        # probe passes (saving its 250 ms timeout) but SMP guests then took 5-16 s to reboot, in
        # the i8042 shutdown path (measured: 3 of 6 reboots slow with it, 0 of 6 without).
        self.i8042 = I8042(on_reset=self.request_reset, kbd_irq=KvmIrqLine(vm, 1))
        self.pio.register(0x60, 1, self.i8042.data_port)
        self.pio.register(0x64, 1, self.i8042.command_port)
        self.rtc = CmosRtc(KvmIrqLine(vm, 8))
        below = sum(r.size for r in mem.ranges if r.gpa < (1 << 32))
        self.rtc.set_memory_size(below, mem.size - below)
        self.pio.register(0x70, 2, self.rtc)
        self.pio.register(0x80, 1, PostCodePort())
        self.pio.register(0x92, 1, FastA20Port(on_reset=self.request_reset))
        self.pio.register(DEBUG_EXIT_PORT, 4, DebugExit(on_exit=self._debug_exit))
        for base, length, sink in probe_sinks():
            self.pio.register(base, length, sink)

    def _add_acpi(self, mem: GuestMemory, pci_irqs: list[PciInterrupt]) -> None:
        """ACPI tables (after the PCI devices, so _PRT lists them) and the PM block they name;
        the MP table stays too, and a guest with ACPI prefers the MADT."""
        pm = AcpiPm(on_poweroff=self._acpi_poweroff, on_reset=self.request_reset)
        self.pio.register(PM_BASE_PORT, PM_BLOCK_LENGTH, pm)
        ports = AcpiPmPorts(pm1a_evt=PM_BASE_PORT + PM1_STS_OFFSET, pm1a_cnt=PM_BASE_PORT + PM1_CNT_OFFSET,
                            pm_tmr=PM_BASE_PORT + PM_TMR_OFFSET, reset=PM_BASE_PORT + RESET_OFFSET,
                            reset_value=pm.reset_value, s5_sleep_type=pm.s5_sleep_type)
        write_acpi_tables(mem, AcpiPlatform(num_cpus=self.config.smp, pm=ports, pci_interrupts=tuple(pci_irqs),
                                            pci_mmio_window=(BAR_WINDOW_START, BAR_WINDOW_END),
                                            isa_irq0_pin=0))
        self.acpi_pm = pm

    def _acpi_poweroff(self) -> None:
        self.finish(0, "guest powered off")
        self._stop_current_vcpu()

    def _debug_exit(self, code: int) -> None:
        self.finish(code & 0xFF, f"guest wrote debug-exit code {code}")
        self._stop_current_vcpu()

    def _stop_current_vcpu(self) -> None:
        """Called from a device on a vCPU thread: leave KVM_RUN before the next guest instruction."""
        for t in self.vcpu_threads:
            if t.is_current():
                t.request_exit(0, "stopped by a device")

    def _add_pci_devices(self, vm, mem: GuestMemory) -> list[PciInterrupt]:
        self.pci = PciRoot(self.mmio)
        self.pio.register(PCI_CONFIG_PORT, 8, self.pci)
        # The virtio modules are imported only when configured: every module costs start-up time.
        backends: list = []
        if self.config.drives:
            from kvmpy.devices.virtio.blk import VirtioBlk
            backends += [VirtioBlk(spec) for spec in self.config.drives]
        if self.config.rng:
            from kvmpy.devices.virtio.rng import VirtioRng
            backends.append(VirtioRng(call_later=self.loop.call_later))
        if self.hvc_console is not None:
            from kvmpy.devices.virtio.console import VirtioConsole
            backends.append(VirtioConsole(self.hvc_console))
        if not backends:
            return []
        from kvmpy.virtiowiring import VirtioPciWiring
        self.wiring = VirtioPciWiring(vm, mem, self.pci, self.loop, self.router)
        return [self.wiring.add(backend) for backend in backends]

    def _create_vcpus(self, entry) -> None:
        cfg = self.config
        tsc_deadline = cfg.tsc_deadline and bool(self.vm.check_extension(lib.KVM_CAP_TSC_DEADLINE_TIMER))
        for i in range(cfg.smp):
            vcpu = self.vm.create_vcpu(i)
            entries = [ffi.new("struct kvm_cpuid_entry2 *", e.as_dict())
                       for e in guest_cpuid(self._cpuid_entries(), i, cfg.smp, tsc_deadline)]
            vcpu.set_cpuid2(entries)
            vcpu.set_msrs(boot_msrs())
            self._set_lapic_lints(vcpu)
            if i == 0:
                regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
                apply_entry(regs, sregs, entry)
                vcpu.set_sregs(sregs)
                vcpu.set_regs(regs)
                fpu = vcpu.get_fpu()
                fpu.fcw = 0x37F
                fpu.mxcsr = 0x1F80
                vcpu.set_fpu(fpu)
            self.vcpu_threads.append(VcpuThread(vcpu, self.pio, self.mmio, on_stop=self._on_vcpu_stop,
                                                fastpio=None if cfg.stats else self._fastpio))

    def _cpuid_entries(self) -> list:
        c = self._host_cpuid
        return [c.entries[i] for i in range(c.nent)]

    @staticmethod
    def _set_lapic_lints(vcpu) -> None:
        """LINT0 = ExtINT (the PIC, virtual-wire mode), LINT1 = NMI, as the MP table says."""
        lapic = vcpu.get_lapic()
        buf = ffi.buffer(lapic.regs)
        for off, mode in ((LAPIC_LVT0, APIC_MODE_EXTINT), (LAPIC_LVT1, APIC_MODE_NMI)):
            v = int.from_bytes(buf[off:off + 4], "little")
            v = (v & ~0x700 & ~0x10000) | (mode << 8)
            buf[off:off + 4] = v.to_bytes(4, "little")
        vcpu.set_lapic(lapic)

    # -- running -----------------------------------------------------------------------------
    def run(self) -> MachineExit:
        """Boot and run until the guest ends; reboots rebuild the machine unless --no-reboot."""
        install_kick_signal()
        signal.signal(REPORT_SIGNAL, self._on_report_signal)
        self.serial = None
        self.serial_console.start(_LateTarget(lambda: self.serial),
                                  on_quit=lambda: self.finish(0, "quit from the console"))
        vcon = None
        if self.hvc_console is not None:
            self.hvc_console.start(_LateTarget(lambda: vcon), on_quit=lambda: self.finish(0, "quit"))
        deadline = time.monotonic() + self.config.timeout if self.config.timeout else None
        while True:
            self.boots += 1
            self._build()
            if self.hvc_console is not None:
                from kvmpy.devices.virtio.console import VirtioConsole
                vcon = self.wiring.backend(VirtioConsole)
            self.loop.start()
            for t in self.vcpu_threads:
                t.start()
            log.info("boot %d: %d vCPU(s) running", self.boots, len(self.vcpu_threads))
            while not self._done.wait(0.2):
                if self._report_requested:
                    self._report_requested = False
                    self.write_report(sys.stderr)
                if deadline is not None and time.monotonic() > deadline:
                    self.finish(124, f"timed out after {self.config.timeout:g} s")
            self._teardown()
            with self._end_lock:
                reset, self._reset_requested = self._reset_requested, False
                if self._end is not None or not reset:
                    break
            self._done.clear()
            log.info("guest reset: rebuilding the machine")
        return self._end or MachineExit(4, "machine stopped for no recorded reason")

    def _on_report_signal(self, signum: int, frame: object) -> None:
        self._report_requested = True  # the main loop writes it: never pause vCPUs in a handler

    def write_report(self, out: TextIO) -> None:
        """What every vCPU and interrupt controller is doing, and each thread's Python stack:
        for a guest that hangs without a word on its console (SIGUSR2 asks for it)."""
        out.write(f"kvmpy: state report, boot {self.boots}: Python stacks as they were\n"
                  + python_stacks())  # before pausing the vCPUs
        out.flush()
        fastpio = getattr(self, "_fastpio", None)
        lines = ["kvmpy: vCPUs and interrupt controllers"]
        lines += machine_report(self.vcpu_threads, self.vm,
                                self.memory.read if self.memory is not None else None)
        if fastpio is not None:
            lines.append(f"exits answered in C so far: {fastpio.fast_exits}")
        out.write("\n".join(lines) + "\n")
        out.flush()

    def stats_report(self) -> str:
        """Exit counts per address, most frequent first (only with config.stats)."""
        lines = []
        for bus in (getattr(self, "pio", None), getattr(self, "mmio", None)):
            if isinstance(bus, CountingBus):
                total = sum(bus.counts.values())
                lines.append(f"{bus.name}: {total} accesses")
                lines += [f"  {k} {a:#x} {c} {d}" for k, a, c, d in bus.top(15)]
        return "\n".join(lines)

    def _teardown(self) -> None:
        for t in self.vcpu_threads:
            t.stop(timeout=5.0)
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
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self.memory is not None:
            self.memory.close()
            self.memory = None

    def close(self) -> None:
        try:
            self._teardown()
        finally:
            self.serial_console.close()
            if self.hvc_console is not None:
                self.hvc_console.close()
            self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LateTarget:
    """Console input target resolved at delivery time (the virtio console is rebuilt on reboot)."""

    def __init__(self, get):
        self._get = get

    def enqueue_input(self, data: bytes) -> int:
        t = self._get()
        return t.enqueue_input(data) if t is not None else len(data)

    def wait_for_input_space(self, timeout: float | None = None) -> bool:
        t = self._get()
        if t is not None and hasattr(t, "wait_for_input_space"):
            return t.wait_for_input_space(timeout)
        time.sleep(timeout or 0.01)
        return True
