"""What a PC is made of, for the Board: the legacy devices at their ISA ports, the PCI root with
one virtio-pci function per configured backend, and the MP/ACPI tables that describe them.

Every device goes into the board's DeviceTable under a stable id. Virtio backends come from
the configuration through one table (`VIRTIO_BACKENDS`): a function per kind that reads its part
of the MachineConfig and returns the backends to plug, each with its id and the configuration a
migration destination must match. Adding a device kind is adding a row.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from kvmpy.boot.acpi import SCI_IRQ, AcpiPlatform, AcpiPmPorts, write_acpi_tables
from kvmpy.boot.mptable import PciInterrupt, write_mptable
from kvmpy.devices.acpi_pm import (PM1_CNT_OFFSET, PM1_STS_OFFSET, PM_BASE_PORT, PM_BLOCK_LENGTH,
                                   PM_TMR_OFFSET, RESET_OFFSET, AcpiPm)
from kvmpy.devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_WIDTH, DebugExit
from kvmpy.devices.fw_cfg import FW_CFG_PORT, FW_CFG_PORT_SPAN, FwCfg, build_items, load_fw_cfg_files
from kvmpy.devices.i8042 import I8042
from kvmpy.devices.legacy import FastA20Port, PostCodePort, probe_sinks
from kvmpy.devices.pci.host import BAR_WINDOW_END, BAR_WINDOW_START, PciRoot
from kvmpy.devices.rtc import CmosRtc
from kvmpy.devices.serial import REGISTER_WINDOW, Serial16550
from kvmpy.machine.config import MachineConfig
from kvmpy.machine.devices import BusRange
from kvmpy.machine.interrupts import KvmIrqLine
from kvmpy.memslots import GuestMemory

if TYPE_CHECKING:
    from kvmpy.devices.console import Console
    from kvmpy.ioctl import Vm
    from kvmpy.machine.board import Board
    from kvmpy.machine.virtio import VirtioPciWiring

COM1_PORT, COM1_IRQ = 0x3F8, 4
PCI_CONFIG_PORT = 0xCF8


@dataclass
class LegacyDevices:
    serial: Serial16550
    rtc: CmosRtc
    acpi_pm: AcpiPm | None


def add_legacy_devices(board: "Board", vm: "Vm", mem: GuestMemory) -> LegacyDevices:
    """COM1, the i8042, the RTC, the small ports and (with ACPI) the PM block, on the port bus."""
    hooks, table, pio = board.hooks, board.devices, board.pio

    def port(id: str, kind: str, base: int, length: int, device: Any, **config: Any) -> None:
        pio.register(base, length, device)
        table.add(id, kind, device, [BusRange("pio", base, length)], config)

    serial = Serial16550(KvmIrqLine(vm, COM1_IRQ), hooks.serial_out, name="com1")
    port("com1", "isa-serial", COM1_PORT, REGISTER_WINDOW, serial)
    # The mouse (AUX) interrupt is deliberately left unwired: with IRQ 12 wired, Linux's AUX
    # probe passes (saving its 250 ms timeout) but SMP guests then took 5-16 s to reboot, in
    # the i8042 shutdown path (measured: 3 of 6 reboots slow with it, 0 of 6 without).
    i8042 = I8042(on_reset=hooks.reset, kbd_irq=KvmIrqLine(vm, 1))
    pio.register(0x60, 1, i8042.data_port)
    pio.register(0x64, 1, i8042.command_port)
    table.add("i8042", "i8042", i8042, [BusRange("pio", 0x60, 1), BusRange("pio", 0x64, 1)])
    rtc = CmosRtc(KvmIrqLine(vm, 8))
    below = sum(r.size for r in mem.ranges if r.gpa < (1 << 32))
    rtc.set_memory_size(below, mem.size - below)
    port("rtc", "mc146818rtc", 0x70, 2, rtc)
    port("post", "port80", 0x80, 1, PostCodePort())
    port("port92", "port92", 0x92, 1, FastA20Port(on_reset=hooks.reset))
    windows = _add_debug_exits(board.config, port, hooks.debug_exit)
    for base, length, sink in probe_sinks():   # a user's debug-exit (often 0xf4) wins over a sink
        for piece_base, piece_length in _carve(base, length, windows):
            port(f"probe-{piece_base:x}", "probe-sink", piece_base, piece_length, sink)
    fw_cfg = FwCfg(mem, build_items(mem.size, board.config.smp, load_fw_cfg_files(board.config.fw_cfg)))
    port("fw-cfg", "fw_cfg_io", FW_CFG_PORT, FW_CFG_PORT_SPAN, fw_cfg,
         files=sorted(spec.name for spec in board.config.fw_cfg))
    acpi_pm = None
    if board.config.acpi:
        acpi_pm = AcpiPm(on_poweroff=hooks.poweroff, on_reset=hooks.reset, sci=KvmIrqLine(vm, SCI_IRQ))
        port("acpi-pm", "acpi-pm", PM_BASE_PORT, PM_BLOCK_LENGTH, acpi_pm)
    return LegacyDevices(serial, rtc, acpi_pm)


def _add_debug_exits(cfg: MachineConfig, port: Callable[..., None], on_exit: Callable[[int], None]
                     ) -> list[tuple[int, int]]:
    """kvmpy's debug-exit at 0x501, or instead the --device isa-debug-exit ones as QEMU places
    them (any offset in the window exits); their (base, length) windows."""
    if not cfg.debug_exits:
        port("debug-exit", "isa-debug-exit", DEBUG_EXIT_PORT, DEBUG_EXIT_WIDTH, DebugExit(on_exit=on_exit))
        return []
    for i, spec in enumerate(cfg.debug_exits):
        port("debug-exit" if i == 0 else f"debug-exit{i}", "isa-debug-exit", spec.iobase, spec.iosize,
             DebugExit(on_exit=on_exit, window=spec.iosize), iobase=spec.iobase, iosize=spec.iosize)
    return [(spec.iobase, spec.iosize) for spec in cfg.debug_exits]


def _carve(base: int, length: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[base, base+length) minus the holes, as (base, length) pieces."""
    pieces = [(base, base + length)]
    for hole_base, hole_length in holes:
        hole_end = hole_base + hole_length
        pieces = [p for start, end in pieces
                  for p in ((start, min(end, hole_base)), (max(start, hole_end), end)) if p[0] < p[1]]
    return [(start, end - start) for start, end in pieces]


# -- virtio backends, one row per kind --------------------------------------------------------
@dataclass
class BackendContext:
    config: MachineConfig
    call_later: Callable[..., None]
    hvc_console: "Console | None"
    # the machine's TAPs by --nic index, kept across reboots as QEMU keeps its TAPs (the user's
    # addresses and bridge ports on them survive); None: each board makes and closes its own
    taps: "dict[int, Any] | None" = None


Backend = tuple[str, str, Any, dict[str, Any]]    # (id, kind, VirtioDevice, identity config)


def _disks(ctx: BackendContext) -> list[Backend]:
    if not ctx.config.drives:
        return []
    from kvmpy.devices.virtio.blk import VirtioBlk
    out = []
    for i, spec in enumerate(ctx.config.drives):
        blk = VirtioBlk(spec)
        out.append((f"virtio-disk{i}", "virtio-blk-pci", blk,
                    {"readonly": spec.readonly, "serial": spec.serial, "size": _image_size(spec.file)}))
    return out


def _image_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def _rng(ctx: BackendContext) -> list[Backend]:
    if not ctx.config.rng:
        return []
    from kvmpy.devices.virtio.rng import VirtioRng
    return [("virtio-rng0", "virtio-rng-pci", VirtioRng(call_later=ctx.call_later), {})]


def _console(ctx: BackendContext) -> list[Backend]:
    if ctx.hvc_console is None:
        return []
    from kvmpy.devices.virtio.console import VirtioConsole
    return [("virtio-console0", "virtio-serial-pci", VirtioConsole(ctx.hvc_console), {})]


def _nics(ctx: BackendContext) -> list[Backend]:
    if not ctx.config.nics:
        return []
    from kvmpy.vhost.nic import make_nic
    out = []
    for i, spec in enumerate(ctx.config.nics):
        kept = ctx.taps.get(i) if ctx.taps is not None else None
        nic = make_nic(spec, ctx.call_later, tap=kept, close_tap=ctx.taps is None)
        if ctx.taps is not None:
            ctx.taps[i] = nic.backend
        out.append((f"net{i}", "virtio-net-pci", nic, {"mac": spec.mac, "queues": spec.queues}))
    return out


VIRTIO_BACKENDS: list[Callable[[BackendContext], list[Backend]]] = [_disks, _rng, _console, _nics]


def add_virtio_devices(board: "Board", vm: "Vm", mem: GuestMemory, hvc_console: "Console | None"
                       ) -> tuple[PciRoot, "VirtioPciWiring | None", list[PciInterrupt]]:
    """The PCI root at 0xCF8 and a virtio-pci function per backend (the virtio wiring is
    imported only when a backend exists: every module costs start-up time under nesting)."""
    pci = PciRoot(board.mmio)
    board.pio.register(PCI_CONFIG_PORT, 8, pci)
    board.devices.add("pci", "pci-host", pci, [BusRange("pio", PCI_CONFIG_PORT, 8)])
    ctx = BackendContext(board.config, board.loop.call_later, hvc_console, board.taps)
    backends = [b for make in VIRTIO_BACKENDS for b in make(ctx)]
    if not backends:
        return pci, None, []
    from kvmpy.machine.virtio import VirtioPciWiring
    wiring = VirtioPciWiring(vm, mem, pci, board.loop, board.router)
    irqs = []
    for id, kind, backend, config in backends:
        irq = wiring.add(backend)
        function = wiring.devices[-1]
        ranges = [BusRange("pci", irq.slot, 1)] + [BusRange("mmio", function.bar_address(b.index), b.size)
                                                   for b in function.bars if b is not None]
        board.devices.add(id, kind, function, ranges, config)
        irqs.append(irq)
    return pci, wiring, irqs


def write_firmware_tables(mem: GuestMemory, cfg: MachineConfig, pci_irqs: list[PciInterrupt],
                          acpi_pm: AcpiPm | None) -> None:
    """The MP table always; ACPI (after the PCI devices, so _PRT lists them) when enabled, naming
    the PM block. A guest with ACPI prefers the MADT."""
    # KVM routes the in-kernel PIT to IOAPIC pin 0 (identity GSI routing), so say so.
    write_mptable(mem, cfg.smp, pci_irqs, isa_irq0_pin=0)
    if acpi_pm is None:
        return
    ports = AcpiPmPorts(pm1a_evt=PM_BASE_PORT + PM1_STS_OFFSET, pm1a_cnt=PM_BASE_PORT + PM1_CNT_OFFSET,
                        pm_tmr=PM_BASE_PORT + PM_TMR_OFFSET, reset=PM_BASE_PORT + RESET_OFFSET,
                        reset_value=acpi_pm.reset_value, s5_sleep_type=acpi_pm.s5_sleep_type)
    write_acpi_tables(mem, AcpiPlatform(num_cpus=cfg.smp, pm=ports, pci_interrupts=tuple(pci_irqs),
                                        pci_mmio_window=(BAR_WINDOW_START, BAR_WINDOW_END),
                                        isa_irq0_pin=0))
