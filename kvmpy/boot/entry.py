"""How a vCPU must start: the BootEntry dataclass, the GDT the loaders write, apply_entry().

Loaders return plain data; the composer copies it into `struct kvm_regs`/`kvm_sregs` with
apply_entry(), which sets attributes by name so tests can pass SimpleNamespace objects.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from kvmpy.errors import BootError
from kvmpy.boot.layout import GDT_ADDR, IDT_ADDR, STACK_TOP, BootRegion
from kvmpy.boot.pagetables import write_identity_map
from kvmpy.memslots import GuestMemory

MODE_LONG64 = "long64"
MODE_PROTECTED32 = "protected32"

CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
RFLAGS_RESERVED = 1 << 1     # bit 1 always reads as 1; IF (bit 9) stays clear

# Selectors the Linux boot protocol names (__BOOT_CS, __BOOT_DS); PVH and multiboot accept any.
BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20
GDT_ENTRIES = 6              # null, null, code, data, TSS (16 bytes in long mode)

SEG_TYPE_CODE_XR = 0xB       # execute/read, accessed
SEG_TYPE_DATA_RW = 0x3       # read/write, accessed
SEG_TYPE_TSS_BUSY = 0xB      # busy 32/64-bit TSS (system segment)


@dataclass(frozen=True)
class SegmentDescriptor:
    """A segment register's hidden part, as in struct kvm_segment (limit is in bytes)."""
    base: int
    limit: int
    selector: int
    type: int
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0
    g: int = 0
    avl: int = 0

    def encode(self) -> bytes:
        """The 8-byte GDT descriptor (16 bytes for a long-mode TSS with a 64-bit base is not
        needed here: our TSS base is 0, so the upper half is all zero)."""
        raw_limit = self.limit >> 12 if self.g else self.limit
        if raw_limit > 0xFFFFF or self.base > 0xFFFFFFFF:
            raise BootError("encoding a GDT descriptor", detail=f"{self} does not fit a descriptor")
        access = (self.type & 0xF) | (self.s << 4) | ((self.dpl & 3) << 5) | (self.present << 7)
        flags = ((raw_limit >> 16) & 0xF) | (self.avl << 4) | (self.l << 5) | (self.db << 6) | (self.g << 7)
        return struct.pack("<HHBBBB", raw_limit & 0xFFFF, self.base & 0xFFFF, (self.base >> 16) & 0xFF,
                           access, flags, (self.base >> 24) & 0xFF)

    @classmethod
    def decode(cls, raw: bytes, selector: int) -> "SegmentDescriptor":
        """Parse an 8-byte GDT descriptor (what the CPU would load for `selector`)."""
        lim_lo, base_lo, base_mid, access, flags, base_hi = struct.unpack("<HHBBBB", raw[:8])
        g = flags >> 7 & 1
        raw_limit = lim_lo | (flags & 0xF) << 16
        return cls(base=base_lo | base_mid << 16 | base_hi << 24,
                   limit=(raw_limit << 12 | 0xFFF) if g else raw_limit, selector=selector,
                   type=access & 0xF, present=access >> 7 & 1, dpl=access >> 5 & 3, db=flags >> 6 & 1,
                   s=access >> 4 & 1, l=flags >> 5 & 1, g=g, avl=flags >> 4 & 1)


def flat_code(long_mode: bool) -> SegmentDescriptor:
    return SegmentDescriptor(base=0, limit=0xFFFFFFFF, selector=BOOT_CS, type=SEG_TYPE_CODE_XR,
                             db=0 if long_mode else 1, l=1 if long_mode else 0, g=1)


def flat_data() -> SegmentDescriptor:
    return SegmentDescriptor(base=0, limit=0xFFFFFFFF, selector=BOOT_DS, type=SEG_TYPE_DATA_RW, db=1, g=1)


def boot_tss() -> SegmentDescriptor:
    return SegmentDescriptor(base=0, limit=0x67, selector=BOOT_TSS, type=SEG_TYPE_TSS_BUSY, s=0)


@dataclass(frozen=True)
class BootEntry:
    """Everything a vCPU needs to start in the state a boot protocol promises the kernel."""
    kind: str                       # "bzimage", "pvh" or "multiboot"
    mode: str                       # MODE_LONG64 or MODE_PROTECTED32
    rip: int
    rsp: int
    rsi: int
    rbx: int
    rax: int
    rflags: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    gdt_base: int
    gdt_limit: int
    idt_base: int
    idt_limit: int
    cs: SegmentDescriptor
    ds: SegmentDescriptor
    es: SegmentDescriptor
    fs: SegmentDescriptor
    gs: SegmentDescriptor
    ss: SegmentDescriptor
    tr: SegmentDescriptor
    regions: tuple[BootRegion, ...] = field(default=())

    def region(self, name: str) -> BootRegion | None:
        return next((r for r in self.regions if r.name == name), None)


def write_descriptor_tables(mem: GuestMemory, long_mode: bool) -> list[BootRegion]:
    """Write the GDT (flat code/data, TSS) and an empty IDT into low memory."""
    gdt = bytearray(8 * GDT_ENTRIES)
    gdt[BOOT_CS:BOOT_CS + 8] = flat_code(long_mode).encode()
    gdt[BOOT_DS:BOOT_DS + 8] = flat_data().encode()
    gdt[BOOT_TSS:BOOT_TSS + 8] = boot_tss().encode()   # upper 8 bytes (long mode) stay zero
    mem.write(GDT_ADDR, bytes(gdt))
    mem.write(IDT_ADDR, bytes(8))
    return [BootRegion("gdt", GDT_ADDR, len(gdt)), BootRegion("idt", IDT_ADDR, 8)]


def long_mode_entry(mem: GuestMemory, kind: str, rip: int, rsi: int,
                    regions: list[BootRegion]) -> BootEntry:
    """64-bit mode, paging on with the first 4 GiB identity-mapped, interrupts off."""
    tables = write_descriptor_tables(mem, long_mode=True)
    cr3, pt_region = write_identity_map(mem)
    data = flat_data()
    return BootEntry(kind=kind, mode=MODE_LONG64, rip=rip, rsp=STACK_TOP, rsi=rsi, rbx=0, rax=0,
                     rflags=RFLAGS_RESERVED, cr0=CR0_PE | CR0_ET | CR0_PG, cr3=cr3, cr4=CR4_PAE,
                     efer=EFER_LME | EFER_LMA, gdt_base=GDT_ADDR, gdt_limit=8 * GDT_ENTRIES - 1,
                     idt_base=IDT_ADDR, idt_limit=7, cs=flat_code(True), ds=data, es=data, fs=data,
                     gs=data, ss=data, tr=boot_tss(), regions=tuple(regions + tables + [pt_region]))


def protected_mode_entry(mem: GuestMemory, kind: str, rip: int, regions: list[BootRegion], *,
                         rax: int = 0, rbx: int = 0, rsi: int = 0) -> BootEntry:
    """32-bit protected mode, flat segments, paging off, interrupts off (PVH, multiboot,
    and the 32-bit Linux boot protocol)."""
    if rip > 0xFFFFFFFF:
        raise BootError("preparing a 32-bit entry", detail=f"entry point {rip:#x} is above 4 GiB")
    tables = write_descriptor_tables(mem, long_mode=False)
    data = flat_data()
    return BootEntry(kind=kind, mode=MODE_PROTECTED32, rip=rip, rsp=STACK_TOP, rsi=rsi, rbx=rbx, rax=rax,
                     rflags=RFLAGS_RESERVED, cr0=CR0_PE | CR0_ET, cr3=0, cr4=0, efer=0,
                     gdt_base=GDT_ADDR, gdt_limit=8 * GDT_ENTRIES - 1, idt_base=IDT_ADDR, idt_limit=7,
                     cs=flat_code(False), ds=data, es=data, fs=data, gs=data, ss=data, tr=boot_tss(),
                     regions=tuple(regions + tables))


_SEGMENT_FIELDS = ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl")
_ZEROED_GPRS = ("rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def apply_entry(regs: Any, sregs: Any, entry: BootEntry) -> None:
    """Copy `entry` into kvm_regs/kvm_sregs-shaped objects (cffi cdata or anything with those
    attribute names). Registers the protocol does not name are zeroed (the 32-bit Linux
    protocol requires EBP/EDI zero)."""
    for name in _ZEROED_GPRS:
        setattr(regs, name, 0)
    for name in ("rip", "rsp", "rsi", "rbx", "rax", "rflags"):
        setattr(regs, name, getattr(entry, name))
    for seg_name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        target = getattr(sregs, seg_name)
        seg = getattr(entry, seg_name)
        for f in _SEGMENT_FIELDS:
            setattr(target, f, getattr(seg, f))
        target.unusable = 0
    sregs.gdt.base, sregs.gdt.limit = entry.gdt_base, entry.gdt_limit
    sregs.idt.base, sregs.idt.limit = entry.idt_base, entry.idt_limit
    for name in ("cr0", "cr3", "cr4", "efer"):
        setattr(sregs, name, getattr(entry, name))
