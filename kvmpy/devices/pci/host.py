"""PCI bus 0: the host bridge, configuration mechanism #1 (ports 0xCF8/0xCFC) and BAR placement.

The composer registers a PciRoot on the port bus at 0xCF8 (length 8). Functions added to it
get their BARs placed in the 32-bit device hole by a BarAllocator (as firmware would), memory
decoding switched on, and BAR moves applied to the MMIO bus if one is given.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar

from kvmpy.devices.bus import Bus
from kvmpy.devices.irq import IrqLine
from kvmpy.devices.pci.config import (CMD_MEMORY, PCI_COMMAND, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN,
                                      BarRegion, PciFunction, PciFunctionState)
from kvmpy.errors import BusError, ConfigError, StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import check_int, expect_state, versioned

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORT_LENGTH = 8
BAR_WINDOW_START = 0xC000_0000
BAR_WINDOW_END = 0xFEC0_0000  # the IOAPIC (0xFEC00000) and LAPIC (0xFEE00000) sit above
MAX_DEVICES = 32
CONFIG_ADDRESS_MASK = 0x80FF_FFFC   # enable, bus, device, function, register (dword-aligned)


class PciHostBridge(PciFunction):
    """Device 0: an i440FX-like host bridge so guests recognise the bus."""

    DEVICE_KIND: ClassVar[str] = "i440FX"

    def __init__(self) -> None:
        super().__init__("pci-host-bridge", vendor_id=0x8086, device_id=0x1237, class_code=0x060000)


class BarAllocator:
    """Bump allocator for naturally aligned BARs in [start, end)."""

    def __init__(self, start: int = BAR_WINDOW_START, end: int = BAR_WINDOW_END):
        self.start, self.end, self._next = start, end, start

    def allocate(self, size: int) -> int:
        addr = (self._next + size - 1) & ~(size - 1)
        if addr + size > self.end:
            raise ConfigError("placing a PCI BAR", detail=f"no room for {size:#x} bytes below {self.end:#x}")
        self._next = addr + size
        return addr


@dataclass(frozen=True)
class IntxRoute:
    """For the MP table / ACPI: device `slot`'s INTx `pin` (1 = INTA) drives interrupt `gsi`."""
    slot: int
    pin: int
    gsi: int


@versioned("pci-root", 1)
@dataclass
class PciRootState:
    """The 0xCF8 address latch and the host bridge's config space. The other functions on the
    bus are devices of their own (each with its state); which slot holds which is configuration."""
    config_address: int
    host_bridge: PciFunctionState


class PciRoot:
    """Bus 0 with configuration mechanism #1; a port-bus device at 0xCF8..0xCFF."""

    DEVICE_KIND: ClassVar[str] = "i440FX-pcihost"

    def __init__(self, mmio_bus: Bus | None = None, allocator: BarAllocator | None = None,
                 on_bar_moved: Callable[[PciFunction, int, int | None, int | None], None] | None = None):
        self.mmio_bus = mmio_bus
        self.allocator = allocator or BarAllocator()
        self.on_bar_moved = on_bar_moved
        self.functions: dict[int, PciFunction] = {}
        self.intx_routes: list[IntxRoute] = []
        self._latch: object | None = None
        self._sync_latch: Callable[[], None] | None = None
        self._address = 0
        self._ratelog = RateLimitedLog(log)
        self.host_bridge = PciHostBridge()
        self.add(self.host_bridge, slot=0)

    def add(self, function: PciFunction, slot: int | None = None, intx: IrqLine | None = None,
            gsi: int | None = None) -> int:
        """Plug `function` into a slot (next free if None), place its BARs, enable decoding.
        `intx`/`gsi` wire its INTx pin; the route is listed in `intx_routes`."""
        if slot is None:
            slot = next((s for s in range(MAX_DEVICES) if s not in self.functions), None)
            if slot is None:
                raise ConfigError("adding a PCI device", detail="bus 0 is full")
        if not 0 <= slot < MAX_DEVICES or slot in self.functions:
            raise ConfigError("adding a PCI device", detail=f"slot {slot} is invalid or taken")
        self.functions[slot] = function
        function.bar_moved = self._bar_moved
        pin = function.config[PCI_INTERRUPT_PIN]
        if gsi is not None and pin:
            function.config[PCI_INTERRUPT_LINE] = gsi & 0xFF
            self.intx_routes.append(IntxRoute(slot, pin, gsi))
        if intx is not None:
            function.intx = intx
        for bar in function.bars:
            if bar is not None:
                function.set_bar_address(bar.index, self.allocator.allocate(bar.size))
        if any(b is not None for b in function.bars):
            function.config_write(PCI_COMMAND, 2, function.command | CMD_MEMORY)
        return slot

    def _bar_moved(self, function: PciFunction, index: int, old: int | None, new: int | None) -> None:
        bar = function.bars[index]
        if self.mmio_bus is not None and bar is not None:
            if old is not None:
                try:
                    self.mmio_bus.unregister(old)
                except BusError:
                    pass
            if new is not None:
                try:
                    self.mmio_bus.register(new, bar.size, BarRegion(function, index))
                except BusError as e:
                    # The guest put a BAR over something else: leave it undecoded rather than crash.
                    self._ratelog.warning("bar", "%s BAR%d not mapped at %#x: %s", function.name, index, new, e)
                    function._mapped.pop(index, None)
                    new = None
        if self.on_bar_moved is not None:
            self.on_bar_moved(function, index, old, new)

    # -- configuration mechanism #1 -----------------------------------------------------------
    def attach_latch(self, latch: object, sync: Callable[[], None] | None = None) -> None:
        """Keep the 0xCF8 address in `latch.pci_addr` (an exit fast path in C answers probes of
        absent functions and owns the latch; this device then sees only present functions).
        `sync` brings the latch up to date first (guest writes of 0xCF8 may wait in KVM's
        coalesced ring until the next exit drains it)."""
        latch.pci_addr = self._address
        self._latch = latch
        self._sync_latch = sync

    @property
    def address(self) -> int:
        latch = self._latch
        if latch is None:
            return self._address
        if self._sync_latch is not None:
            self._sync_latch()
        return latch.pci_addr

    @address.setter
    def address(self, value: int) -> None:
        if self._latch is None:
            self._address = value
        else:
            self._latch.pci_addr = value

    def present_devfns(self) -> list[int]:
        """Bus-0 devfn numbers that answer configuration cycles."""
        return sorted(slot << 3 for slot in self.functions)

    def _target(self, a: int) -> PciFunction | None:
        """The bus-0 function latch value `a` selects, or None."""
        if not a & 0x8000_0000 or (a >> 16) & 0xFF != 0 or (a >> 8) & 0x7 != 0:
            return None
        return self.functions.get((a >> 11) & 0x1F)

    def read(self, offset: int, size: int) -> bytes:
        if offset < 4:
            if offset == 0 and size == 4:
                return self.address.to_bytes(4, "little")
            return b"\xff" * size
        a = self.address   # read once: each read syncs the latch with KVM's coalesced ring
        fn = self._target(a)
        if fn is None or size not in (1, 2, 4) or (offset - 4) + size > 4:
            return b"\xff" * size
        return fn.config_read((a & 0xFC) + (offset - 4), size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if offset < 4:
            if offset == 0 and size == 4:
                self.address = int.from_bytes(data, "little") & CONFIG_ADDRESS_MASK
            return
        a = self.address
        fn = self._target(a)
        if fn is None or size not in (1, 2, 4) or (offset - 4) + size > 4:
            return
        fn.config_write((a & 0xFC) + (offset - 4), size, int.from_bytes(data, "little"))

    def __repr__(self) -> str:
        return "<PciRoot cf8>"

    # -- state --------------------------------------------------------------------------------
    def state(self) -> PciRootState:
        """The latch as the guest last wrote it: reading `address` syncs it with KVM's
        coalesced ring first (a 0xCF8 write may still sit there)."""
        return PciRootState(self.address, self.host_bridge.state())

    def check_state(self, state: object) -> PciRootState:
        """Validate without touching the bus: a latch value the guest could have written and a
        config space that is this host bridge's."""
        s = expect_state(state, PciRootState, "PCI root state")
        if check_int("PCI root state", "config_address", s.config_address, bits=32) & ~CONFIG_ADDRESS_MASK:
            raise StateError("restoring PCI root state",
                             detail=f"config_address={s.config_address:#x} has reserved bits")
        self.host_bridge.check_state(s.host_bridge)
        return s

    def restore(self, state: PciRootState) -> None:
        s = self.check_state(state)
        self.host_bridge.restore(s.host_bridge)
        self.address = s.config_address
