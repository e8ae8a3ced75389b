"""A PCI function's type-0 configuration header: IDs, command/status, BARs, capability list.

Writes go through a per-byte writable mask, so read-only fields (IDs, BAR size bits,
capability pointers) cannot be changed by the guest. BAR sizing works as on hardware: the size
bits are not writable, so writing all-ones reads back the size mask. When a BAR's decoded
address changes (memory space enable toggled or the BAR reprogrammed) `bar_moved` is called so
the composer can move the bus registration and any ioeventfds.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

from kvmpy.devices.irq import IrqLine
from kvmpy.errors import DeviceError, StateError
from kvmpy.state import check_bytes, expect_state, versioned

log = logging.getLogger(__name__)

PCI_CONFIG_SIZE = 256
_ALL_CONFIG_BITS = (1 << 8 * PCI_CONFIG_SIZE) - 1
PCI_VENDOR_ID, PCI_DEVICE_ID, PCI_COMMAND, PCI_STATUS = 0x00, 0x02, 0x04, 0x06
PCI_REVISION, PCI_CLASS_PROG, PCI_CACHE_LINE, PCI_LATENCY, PCI_HEADER_TYPE = 0x08, 0x09, 0x0C, 0x0D, 0x0E
PCI_BAR0, PCI_SUBSYSTEM_VENDOR_ID, PCI_SUBSYSTEM_ID, PCI_ROM = 0x10, 0x2C, 0x2E, 0x30
PCI_CAPABILITY_LIST, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN = 0x34, 0x3C, 0x3D
CMD_IO, CMD_MEMORY, CMD_MASTER, CMD_SERR, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x100, 0x400
STATUS_INTERRUPT, STATUS_CAP_LIST = 0x08, 0x10
BAR_MEM_64, BAR_MEM_PREFETCH = 0x4, 0x8
CAP_ID_VENDOR, CAP_ID_MSIX = 0x09, 0x11
_CAP_START = 0x40


class BarHandler(Protocol):
    """What backs a BAR: reads and writes at offsets inside it."""

    def bar_read(self, index: int, offset: int, size: int) -> bytes: ...

    def bar_write(self, index: int, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class Bar:
    index: int
    size: int
    is64: bool
    prefetchable: bool


class BarRegion:
    """Adapter registered on the MMIO bus: forwards accesses to the owning function's BAR."""

    def __init__(self, function: "PciFunction", index: int):
        self.function = function
        self.index = index

    def read(self, offset: int, size: int) -> bytes:
        return self.function.bar_read(self.index, offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self.function.bar_write(self.index, offset, data)

    def __repr__(self) -> str:
        return f"<BAR{self.index} of {self.function.name}>"


@versioned("pci-function", 1)
@dataclass
class PciFunctionState:
    """The 256-byte configuration space. Everything else a function keeps (BAR placement, INTx
    level) is derived from it: the decoded BARs from the BAR registers and the command
    register, the INTx level from the status register's interrupt bit."""
    config: bytes


BarMovedCallback = Callable[["PciFunction", int, "int | None", "int | None"], None]


class PciFunction:
    """Config space and BAR bookkeeping shared by every PCI device (and the host bridge).

    State: `state()`/`check_state()`/`restore()` cover the config space. A subclass with more
    state (virtio-pci) overrides all three with a state that nests this one as its `pci` part,
    and handles that part with `_check_config_space`/`_load_config_space` (not overridden, so
    they mean the same in every subclass), validating everything before applying anything."""

    DEVICE_KIND: ClassVar[str] = "pci-device"

    def __init__(self, name: str, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, irq_pin: int = 0):
        self.name = name
        self.config = bytearray(PCI_CONFIG_SIZE)
        self._wmask = bytearray(PCI_CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * 6
        self.bar_moved: BarMovedCallback | None = None
        self.intx: IrqLine | None = None
        self._intx_level = False
        self._mapped: dict[int, int] = {}
        self._cap_next = _CAP_START
        self._cap_last_ptr = PCI_CAPABILITY_LIST
        self._put(PCI_VENDOR_ID, 2, vendor_id)
        self._put(PCI_DEVICE_ID, 2, device_id)
        self._put(PCI_REVISION, 1, revision)
        self._put(PCI_CLASS_PROG, 3, class_code)
        self._put(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(PCI_SUBSYSTEM_ID, 2, subsystem_id)
        self._put(PCI_INTERRUPT_PIN, 1, irq_pin)
        self._setmask(PCI_COMMAND, 2, CMD_IO | CMD_MEMORY | CMD_MASTER | CMD_SERR | CMD_INTX_DISABLE)
        self._setmask(PCI_CACHE_LINE, 2, 0xFFFF)
        self._setmask(PCI_INTERRUPT_LINE, 1, 0xFF)

    # -- construction helpers -----------------------------------------------------------------
    def _put(self, off: int, size: int, value: int) -> None:
        self.config[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _get(self, off: int, size: int) -> int:
        return int.from_bytes(self.config[off:off + size], "little")

    def _setmask(self, off: int, size: int, mask: int) -> None:
        self._wmask[off:off + size] = mask.to_bytes(size, "little")

    def add_bar(self, index: int, size: int, is64: bool = True, prefetchable: bool = False) -> Bar:
        """Declare a memory BAR of `size` bytes (a power of two, >= 4 KiB)."""
        last = index + (1 if is64 else 0)
        if not 0 <= index <= 5 or last > 5 or size < 4096 or size & (size - 1):
            raise DeviceError(f"adding BAR{index} to {self.name}", detail=f"bad index or size {size:#x}")
        if any(self.bars[i] is not None for i in range(index, last + 1)):
            raise DeviceError(f"adding BAR{index} to {self.name}", detail="slot already used")
        bar = Bar(index, size, is64, prefetchable)
        self.bars[index] = bar
        low = (BAR_MEM_64 if is64 else 0) | (BAR_MEM_PREFETCH if prefetchable else 0)
        self._put(PCI_BAR0 + 4 * index, 4, low)
        self._setmask(PCI_BAR0 + 4 * index, 4, ~(size - 1) & 0xFFFFFFF0)
        if is64:
            self._setmask(PCI_BAR0 + 4 * (index + 1), 4, ~((size - 1) >> 32) & 0xFFFFFFFF)
        return bar

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (body excludes the id/next bytes); returns its config offset."""
        length = 2 + len(body)
        off = self._cap_next
        if off + length > PCI_CONFIG_SIZE:
            raise DeviceError(f"adding capability {cap_id:#x} to {self.name}", detail="config space full")
        self.config[off] = cap_id
        self.config[off + 1] = 0
        self.config[off + 2:off + length] = body
        if wmask is not None:
            self._wmask[off + 2:off + 2 + len(wmask)] = wmask
        self.config[self._cap_last_ptr] = off
        self._cap_last_ptr = off + 1
        self._cap_next = (off + length + 3) & ~3
        self._put(PCI_STATUS, 2, self._get(PCI_STATUS, 2) | STATUS_CAP_LIST)
        return off

    def set_bar_address(self, index: int, address: int) -> None:
        """Firmware-style assignment (the allocator); takes effect when memory decode is on."""
        bar = self.bars[index]
        if bar is None or address % bar.size:
            raise DeviceError(f"placing BAR{index} of {self.name}", detail=f"address {address:#x}")
        low = self._get(PCI_BAR0 + 4 * index, 4) & 0xF
        self._put(PCI_BAR0 + 4 * index, 4, (address & 0xFFFFFFF0) | low)
        if bar.is64:
            self._put(PCI_BAR0 + 4 * (index + 1), 4, address >> 32)
        elif address >> 32:
            raise DeviceError(f"placing BAR{index} of {self.name}", detail="32-bit BAR above 4 GiB")
        self._update_mappings()

    # -- config access ------------------------------------------------------------------------
    def config_read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > PCI_CONFIG_SIZE:
            return (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0
        special = self._special_read(offset, size)
        if special is not None:
            return special
        return self._get(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > PCI_CONFIG_SIZE:
            return
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            m = self._wmask[offset + i]
            self.config[offset + i] = (self.config[offset + i] & ~m & 0xFF) | (b & m)
        if offset < PCI_COMMAND + 2 and offset + size > PCI_COMMAND:
            self._update_intx()
            self._update_mappings()
        elif offset < PCI_BAR0 + 24 and offset + size > PCI_BAR0:
            self._update_mappings()
        self._config_written(offset, size, value)

    def _special_read(self, offset: int, size: int) -> int | None:
        """Hook for registers with read side effects (e.g. a PCI_CFG access window)."""
        return None

    def _config_written(self, offset: int, size: int, value: int) -> None:
        """Hook for subclasses reacting to writes (MSI-X control, PCI_CFG window)."""

    # -- BARs ---------------------------------------------------------------------------------
    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        if bar is None:
            return 0
        addr = self._get(PCI_BAR0 + 4 * index, 4) & 0xFFFFFFF0
        if bar.is64:
            addr |= self._get(PCI_BAR0 + 4 * (index + 1), 4) << 32
        return addr

    @property
    def command(self) -> int:
        return self._get(PCI_COMMAND, 2)

    def mapped_bars(self) -> dict[int, int]:
        """BAR index -> guest-physical address for every BAR currently decoded."""
        return dict(self._mapped)

    def _update_mappings(self) -> None:
        mem_on = bool(self.command & CMD_MEMORY)
        for bar in self.bars:
            if bar is None:
                continue
            addr = self.bar_address(bar.index)
            limit = 1 << (64 if bar.is64 else 32)
            new = addr if mem_on and addr != 0 and addr + bar.size <= limit else None
            old = self._mapped.get(bar.index)
            if new == old:
                continue
            if new is None:
                del self._mapped[bar.index]
            else:
                self._mapped[bar.index] = new
            if self.bar_moved is not None:
                self.bar_moved(self, bar.index, old, new)

    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        return None

    # -- INTx ---------------------------------------------------------------------------------
    def set_intx(self, level: bool) -> None:
        """Drive INTx (level-triggered); masked by the command register's INTx-disable bit."""
        self._intx_level = bool(level)
        self._update_intx()

    def _update_intx(self) -> None:
        status = self._get(PCI_STATUS, 2)
        self._put(PCI_STATUS, 2, status | STATUS_INTERRUPT if self._intx_level else status & ~STATUS_INTERRUPT)
        if self.intx is not None:
            self.intx.set_level(self._intx_level and not self.command & CMD_INTX_DISABLE)

    # -- state --------------------------------------------------------------------------------
    def state(self) -> PciFunctionState:
        return PciFunctionState(bytes(self.config))

    def check_state(self, state: object) -> PciFunctionState:
        return self._check_config_space(state)

    def restore(self, state: PciFunctionState) -> None:
        self._load_config_space(self._check_config_space(state))

    def _check_config_space(self, state: object) -> PciFunctionState:
        """Validate a config space for this function without touching it: 256 bytes whose
        read-only bits (IDs, class, BAR type and size bits, the capability list) are exactly
        this function's, so a stream cannot give the guest another device."""
        what = f"{self.name} config space"
        s = expect_state(state, PciFunctionState, what)
        cfg = check_bytes(what, "config", s.config, size=PCI_CONFIG_SIZE)
        # All 256 bytes at once as one integer (a per-byte loop was most of a restore's time):
        # the read-only bits are those the write mask does not cover, less the status
        # register's interrupt bit (it mirrors the INTx level, restored from it).
        read_only = ~int.from_bytes(self._wmask, "little") & _ALL_CONFIG_BITS & ~(STATUS_INTERRUPT << 8 * PCI_STATUS)
        differ = (int.from_bytes(cfg, "little") ^ int.from_bytes(self.config, "little")) & read_only
        if differ:
            i = ((differ & -differ).bit_length() - 1) // 8     # the lowest differing byte
            raise StateError(f"restoring {what}", detail=f"read-only byte {i:#x} differs")
        return s

    def _load_config_space(self, s: PciFunctionState) -> None:
        """Load a checked config space; re-derive the BAR mappings and the INTx line from it."""
        self.config[:] = s.config
        self._intx_level = bool(self.config[PCI_STATUS] & STATUS_INTERRUPT)
        self._update_mappings()
        self._update_intx()
