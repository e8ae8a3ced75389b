"""Identity-mapped page tables for the 64-bit entry, and a walker that reads them back.

The 64-bit boot protocol needs the kernel, zero page and command line identity-mapped; mapping
the whole first 4 GiB with 2 MiB pages covers them wherever they are and needs only 6 pages.
(2 MiB rather than 1 GiB pages: 1 GiB pages need CPUID pdpe1gb, which a guest CPU may lack.)
"""
from __future__ import annotations

import struct

from kvmpy.errors import BootError
from kvmpy.boot.layout import GiB, MiB, PAGE_SIZE, PD_ADDR, PDPT_ADDR, PML4_ADDR, BootRegion
from kvmpy.memslots import GuestMemory

PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_LARGE = 1 << 7          # PS: this PDE maps a 2 MiB page (in a PDPTE: a 1 GiB page)
ADDR_MASK = 0x000F_FFFF_FFFF_F000
IDENTITY_GIB = 4


def write_identity_map(mem: GuestMemory, gib: int = IDENTITY_GIB) -> tuple[int, BootRegion]:
    """Map virtual [0, gib GiB) to the same physical addresses; returns (cr3, region written)."""
    if not 1 <= gib <= 512:
        raise BootError("building page tables", detail=f"cannot identity-map {gib} GiB with one PDPT")
    size = PD_ADDR + gib * PAGE_SIZE - PML4_ADDR
    if not mem.contains(PML4_ADDR, size):
        raise BootError("building page tables", detail="guest RAM too small for the page tables")
    mem.fill(PML4_ADDR, size, 0)
    mem.write_u64(PML4_ADDR, PDPT_ADDR | PTE_PRESENT | PTE_WRITABLE)
    for g in range(gib):
        pd = PD_ADDR + g * PAGE_SIZE
        mem.write_u64(PDPT_ADDR + 8 * g, pd | PTE_PRESENT | PTE_WRITABLE)
        entries = [(g * GiB + i * 2 * MiB) | PTE_PRESENT | PTE_WRITABLE | PTE_LARGE for i in range(512)]
        mem.write(pd, struct.pack("<512Q", *entries))
    return PML4_ADDR, BootRegion("page tables", PML4_ADDR, size)


def translate(mem: GuestMemory, cr3: int, virt: int) -> int | None:
    """Walk 4-level page tables like the MMU does; the physical address, or None if unmapped."""
    table = cr3 & ADDR_MASK
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = mem.read_u64(table + 8 * ((virt >> shift) & 0x1FF))
        if not entry & PTE_PRESENT:
            return None
        if level in (1, 2) and entry & PTE_LARGE:
            page_mask = (1 << shift) - 1
            return (entry & ADDR_MASK & ~page_mask) | (virt & page_mask)
        table = entry & ADDR_MASK
    return table | (virt & 0xFFF)
