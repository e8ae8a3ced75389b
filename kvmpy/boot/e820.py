"""The guest's physical memory map (e820) from the RAM layout, shared by all boot formats.

Low memory follows the PC convention (Firecracker, cloud-hypervisor and kvmtool do the same):
RAM up to the EBDA at 0x9fc00, then 0x9fc00-0x100000 (EBDA, VGA window, option and BIOS ROMs)
reserved, then RAM from 1 MiB to the device hole, and the rest above 4 GiB. The MP table sits in
the reserved EBDA, so the kernel never hands it out as free memory.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable

from kvmpy.boot.layout import EBDA_START, HIMEM_START
from kvmpy.memslots import RamRange

E820_RAM = 1
E820_RESERVED = 2
E820_ENTRY_SIZE = 20          # struct boot_e820_entry: u64 addr, u64 size, u32 type (packed)
E820_MAX_ZERO_PAGE = 128      # entries that fit boot_params.e820_table


@dataclass(frozen=True)
class E820Entry:
    addr: int
    size: int
    type: int

    @property
    def end(self) -> int:
        return self.addr + self.size

    def pack(self) -> bytes:
        return struct.pack("<QQI", self.addr, self.size, self.type)


def build_e820(ranges: Iterable[RamRange]) -> list[E820Entry]:
    """RAM ranges minus the low reserved window, plus that window as reserved; sorted."""
    entries: list[E820Entry] = []
    reserved_added = False
    for r in sorted(ranges, key=lambda r: r.gpa):
        start, end = r.gpa, r.end
        if start < HIMEM_START and end > EBDA_START:
            if start < EBDA_START:
                entries.append(E820Entry(start, EBDA_START - start, E820_RAM))
            entries.append(E820Entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED))
            reserved_added = True
            start = HIMEM_START
        if end > start:
            entries.append(E820Entry(start, end - start, E820_RAM))
    if not reserved_added:
        entries.append(E820Entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED))
    return sorted(entries, key=lambda e: e.addr)


def lower_memory_kib(entries: list[E820Entry]) -> int:
    """Contiguous RAM from address 0, in KiB (multiboot mem_lower, at most 640)."""
    first = next((e for e in entries if e.addr == 0 and e.type == E820_RAM), None)
    return min(first.size, 640 * 1024) // 1024 if first else 0


def upper_memory_kib(entries: list[E820Entry]) -> int:
    """Contiguous RAM from 1 MiB up to the first hole, in KiB (multiboot mem_upper)."""
    first = next((e for e in entries if e.addr == HIMEM_START and e.type == E820_RAM), None)
    return first.size // 1024 if first else 0
