"""Guest-physical layout of RAM: which GPA ranges hold RAM and where the device hole is.

RAM that would overlap the 32-bit device hole (PCI BARs, IOAPIC, LAPIC, HPET, flash) is moved
above 4 GiB, as on real PCs. Pure arithmetic: tier-0 testable.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from kvmpy.errors import ConfigError

PAGE_SIZE = 4096
GiB = 1 << 30
MiB = 1 << 20
HOLE_START = 0xC000_0000   # 3 GiB: start of the 32-bit MMIO hole
HOLE_END = 1 << 32
MIN_RAM = 1 * MiB
MAX_RAM = 1 << 52          # x86-64's physical address width: no guest RAM can be larger


@dataclass(frozen=True)
class RamRange:
    """One contiguous RAM range: guest-physical `gpa`, `size` bytes, at `offset` in the memfd."""
    slot: int
    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def ram_ranges(total: int, hole_start: int = HOLE_START) -> list[RamRange]:
    """Split `total` bytes of RAM around the device hole: [0, hole) then [4 GiB, ...)."""
    if total < MIN_RAM or total % PAGE_SIZE:
        raise ConfigError("laying out guest RAM",
                          detail=f"size {total} must be a multiple of 4 KiB and at least 1 MiB")
    if hole_start % PAGE_SIZE or not 0 < hole_start <= HOLE_END:
        raise ConfigError("laying out guest RAM", detail=f"bad hole start {hole_start:#x}")
    low = min(total, hole_start)
    ranges = [RamRange(0, 0, low, 0)]
    if total > low:
        ranges.append(RamRange(1, HOLE_END, total - low, low))
    return ranges


def parse_size(text: str) -> int:
    """'512M', '2G', '1024' (MiB, like QEMU's -m) -> bytes."""
    t = text.strip().upper().removesuffix("B")
    mult = MiB
    if t and t[-1] in "KMGT":
        mult = {"K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[t[-1]]
        t = t[:-1]
    try:
        value = float(t)
    except ValueError:
        raise ConfigError("parsing a memory size", detail=f"{text!r} is not a size like 512M or 2G") from None
    # float() accepts "inf", "nan" and "1e30": a size must be a finite number a guest could have
    if not math.isfinite(value) or value * mult > MAX_RAM:
        raise ConfigError("parsing a memory size",
                          detail=f"{text!r} is not a size like 512M or 2G (at most {MAX_RAM >> 40} TiB)")
    size = int(value * mult)
    if size <= 0:
        raise ConfigError("parsing a memory size", detail=f"{text!r} is not positive")
    return size
