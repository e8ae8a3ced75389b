"""Entry state: identity page tables, GDT descriptors, apply_entry, the e820 map, boot MSRs."""
from types import SimpleNamespace

import pytest

from kvmpy.boot import MODE_LONG64, BootEntry, SegmentDescriptor, apply_entry, boot_msrs, build_e820, load_kernel
from kvmpy.boot.e820 import E820_RAM, E820_RESERVED, lower_memory_kib, upper_memory_kib
from kvmpy.boot.entry import BOOT_CS, BOOT_DS, BOOT_TSS, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME
from kvmpy.boot.layout import GDT_ADDR
from kvmpy.boot.pagetables import translate
from kvmpy.memslots import GuestMemory, ram_ranges

from test_boot_support import make_bzimage, write

MiB, GiB = 1 << 20, 1 << 30


@pytest.fixture(scope="module")
def booted(tmp_path_factory):
    m = GuestMemory.create(64 * MiB)
    entry = load_kernel(m, write(tmp_path_factory.mktemp("k"), "bz", make_bzimage()), "console=ttyS0")
    yield m, entry
    m.close()


@pytest.mark.parametrize("virt", [0, 0x7000, 0x1000200, 0x20000, 0x3FFFFFF, 0xBFFFFFFF, 0xFEE00000, 0xFFFFFFFF])
def test_page_tables_identity_map_first_4gib(booted, virt):
    mem, entry = booted
    assert translate(mem, entry.cr3, virt) == virt


def test_page_tables_end_at_4gib(booted):
    mem, entry = booted
    assert translate(mem, entry.cr3, 1 << 32) is None
    assert translate(mem, entry.cr3, 1 << 39) is None


def test_gdt_decodes_to_flat_64bit_code_and_data(booted):
    mem, entry = booted
    assert entry.gdt_base == GDT_ADDR and entry.gdt_limit >= BOOT_TSS + 15
    gdt = mem.read(entry.gdt_base, entry.gdt_limit + 1)
    assert gdt[:16] == bytes(16)                                # null descriptors
    code = SegmentDescriptor.decode(gdt[BOOT_CS:BOOT_CS + 8], BOOT_CS)
    data = SegmentDescriptor.decode(gdt[BOOT_DS:BOOT_DS + 8], BOOT_DS)
    tss = SegmentDescriptor.decode(gdt[BOOT_TSS:BOOT_TSS + 8], BOOT_TSS)
    assert (code.l, code.db, code.s, code.present, code.dpl, code.type & 0x8) == (1, 0, 1, 1, 0, 0x8)
    assert (code.base, code.limit, code.g) == (0, 0xFFFFFFFF, 1)
    assert (data.base, data.limit, data.s, data.type & 0xA, data.db) == (0, 0xFFFFFFFF, 1, 0x2, 1)
    assert (tss.s, tss.type, tss.limit, tss.base) == (0, 0xB, 0x67, 0)
    assert gdt[BOOT_TSS + 8:BOOT_TSS + 16] == bytes(8)          # long-mode TSS upper half
    # the hidden segment state the vCPU starts with is what the GDT says
    assert entry.cs == code and entry.ds == entry.ss == entry.es == data and entry.tr == tss


def test_long_mode_control_registers(booted):
    _, entry = booted
    assert entry.mode == MODE_LONG64
    assert entry.cr0 & (CR0_PE | CR0_PG) == CR0_PE | CR0_PG and entry.cr4 & CR4_PAE
    assert entry.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    assert entry.rflags & (1 << 9) == 0 and entry.rflags & 2
    assert entry.cs.selector == 0x10 and entry.ds.selector == 0x18     # __BOOT_CS / __BOOT_DS


def _segment():
    return SimpleNamespace(**{k: 99 for k in ("base", "limit", "selector", "type", "present", "dpl", "db",
                                              "s", "l", "g", "avl", "unusable")})


def test_apply_entry_sets_every_field(booted):
    _, entry = booted
    regs = SimpleNamespace(**{r: 0xDEAD for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8",
                                                  "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")})
    sregs = SimpleNamespace(cs=_segment(), ds=_segment(), es=_segment(), fs=_segment(), gs=_segment(),
                            ss=_segment(), tr=_segment(), gdt=SimpleNamespace(base=1, limit=1),
                            idt=SimpleNamespace(base=1, limit=1), cr0=0, cr3=0, cr4=0, efer=0)
    apply_entry(regs, sregs, entry)
    assert (regs.rip, regs.rsi, regs.rsp, regs.rflags) == (entry.rip, entry.rsi, entry.rsp, entry.rflags)
    assert regs.rdi == regs.rbp == regs.r15 == regs.rcx == 0
    assert (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer) == (entry.cr0, entry.cr3, entry.cr4, entry.efer)
    assert (sregs.gdt.base, sregs.gdt.limit) == (entry.gdt_base, entry.gdt_limit)
    assert (sregs.idt.base, sregs.idt.limit) == (entry.idt_base, entry.idt_limit)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        seg, want = getattr(sregs, name), getattr(entry, name)
        assert seg.unusable == 0
        assert all(getattr(seg, f) == getattr(want, f) for f in ("base", "limit", "selector", "type", "present",
                                                                 "dpl", "db", "s", "l", "g", "avl"))


def test_descriptor_encode_decode_round_trip():
    for seg in (SegmentDescriptor(0x12345678, 0xFFFFF, 8, 0x3, db=1),
                SegmentDescriptor(0, 0xFFFFFFFF, 0x10, 0xB, l=1, g=1, avl=1, dpl=3)):
        assert SegmentDescriptor.decode(seg.encode(), seg.selector) == seg


def test_boot_entry_is_plain_data(booted):
    _, entry = booted
    assert isinstance(entry, BootEntry)
    assert {r.name for r in entry.regions} >= {"kernel", "zero page", "cmdline", "gdt", "page tables"}
    names = sorted(entry.regions, key=lambda r: r.gpa)
    for a, b in zip(names, names[1:]):
        assert a.end <= b.gpa, f"{a} overlaps {b}"


def test_e820_split_around_hole():
    table = build_e820(ram_ranges(5 * GiB))
    assert [(e.addr, e.size, e.type) for e in table] == [
        (0, 0x9FC00, E820_RAM), (0x9FC00, 0x60400, E820_RESERVED),
        (0x100000, 3 * GiB - 0x100000, E820_RAM), (4 * GiB, 2 * GiB, E820_RAM)]
    for a, b in zip(table, table[1:]):
        assert a.end <= b.addr
    assert not any(e.addr < 4 * GiB and e.end > 3 * GiB for e in table)
    assert lower_memory_kib(table) == 639 and upper_memory_kib(table) == (3 * GiB - MiB) // 1024


def test_e820_one_mib_guest():
    table = build_e820(ram_ranges(MiB))
    assert [(e.addr, e.size, e.type) for e in table] == [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x60400, E820_RESERVED)]
    assert upper_memory_kib(table) == 0


def test_boot_msrs():
    msrs = boot_msrs()
    assert msrs[0x1A0] & 1                        # IA32_MISC_ENABLE.fast_strings
    assert msrs[0x2FF] == 0x806                   # MTRRdefType: enabled, write-back
    assert msrs[0x277] == 0x0007040600070406      # PAT power-on value
    assert msrs[0xC0000082] == 0                  # LSTAR
