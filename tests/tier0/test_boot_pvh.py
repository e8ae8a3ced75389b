"""PVH boot of an ELF with XEN_ELFNOTE_PHYS32_ENTRY: segments, hvm_start_info, 32-bit entry."""
import struct

import pytest

from kvmpy.boot import MODE_PROTECTED32, build_e820, load_kernel
from kvmpy.boot.layout import CMDLINE_ADDR
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

from test_boot_support import make_elf, write

MiB = 1 << 20
TEXT = bytes(range(256)) * 16
DATA = b"DATA" * 100


def pvh_elf(entry=0x1000010, desc_bytes=8, bits=64, **kw):
    fmt = "<Q" if desc_bytes == 8 else "<I"
    notes = [(b"GNU", 3, b"\x01" * 20), (b"Xen", 18, struct.pack(fmt, entry))]
    segments = [(0x1000000, TEXT, len(TEXT)), (0x1200000, DATA, len(DATA) + 0x3000)]
    return make_elf(segments, 0xFFFFFFFF81000000 if bits == 64 else 0xC1000000, bits=bits, notes=notes, **kw)


@pytest.fixture
def mem():
    m = GuestMemory.create(64 * MiB)
    m.fill(0x1200000, 0x4000, 0xAA)              # stale bytes where the bss goes
    yield m
    m.close()


@pytest.mark.parametrize("desc_bytes, bits", [(8, 64), (4, 64), (4, 32)])
def test_segments_and_entry(mem, tmp_path, desc_bytes, bits):
    entry = load_kernel(mem, write(tmp_path, "vmlinux", pvh_elf(desc_bytes=desc_bytes, bits=bits)), "root=/dev/vda")
    assert entry.kind == "pvh" and entry.mode == MODE_PROTECTED32
    assert mem.read(0x1000000, len(TEXT)) == TEXT and mem.read(0x1200000, len(DATA)) == DATA
    assert mem.read(0x1200000 + len(DATA), 0x3000) == bytes(0x3000)       # bss zeroed
    assert entry.rip == 0x1000010 and entry.rbx == 0x6000
    assert entry.cr0 & 1 and not entry.cr0 & (1 << 31) and entry.cr4 == 0 and entry.efer == 0
    assert entry.cs.db == 1 and entry.cs.l == 0 and entry.cs.limit == 0xFFFFFFFF and entry.cs.base == 0
    assert entry.ds.limit == entry.ss.limit == entry.es.limit == 0xFFFFFFFF and entry.ds.type & 0x2
    assert entry.tr.base == 0 and entry.tr.limit == 0x67 and entry.tr.s == 0
    assert not entry.rflags & ((1 << 9) | (1 << 17) | (1 << 8))           # IF, VM, TF clear


def test_start_info_fields(mem, tmp_path):
    initrd = b"INITRD" * 1000
    load_kernel(mem, write(tmp_path, "vmlinux", pvh_elf()), "console=hvc0", write(tmp_path, "rd", initrd))
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries,
     reserved) = struct.unpack("<IIIIQQQQII", mem.read(0x6000, 0x38))
    assert (magic, version, flags, rsdp, reserved) == (0x336EC578, 1, 0, 0, 0)
    assert cmdline == CMDLINE_ADDR and mem.read(cmdline, 13) == b"console=hvc0\0"
    assert nr_modules == 1
    paddr, size, mod_cmdline, mod_reserved = struct.unpack("<QQQQ", mem.read(modlist, 32))
    assert size == len(initrd) and mem.read(paddr, size) == initrd and paddr % 4096 == 0
    assert paddr == (64 * MiB - len(initrd)) // 4096 * 4096 and paddr >= 0x1203000 + len(DATA)
    expected = build_e820(mem.ranges)
    assert memmap_entries == len(expected)
    got = [struct.unpack("<QQII", mem.read(memmap + 24 * i, 24)) for i in range(memmap_entries)]
    assert got == [(e.addr, e.size, e.type, 0) for e in expected]


def test_no_initrd_means_no_modules(mem, tmp_path):
    load_kernel(mem, write(tmp_path, "vmlinux", pvh_elf()), "")
    assert struct.unpack("<IQ", mem.read(0x600C, 12)) == (0, 0)


@pytest.mark.parametrize("image, reason", [
    (pvh_elf(entry=0x5000000), "outside every loaded segment"),
    (pvh_elf(entry=1 << 33), "above 4 GiB"),
    (make_elf([(0x1000000, b"x", 1)], 0x1000000, notes=[(b"Xen", 18, b"\0" * 3)]), "3-byte value"),
    (make_elf([(0x80000, b"x", 1)], 0x80000, notes=[(b"Xen", 18, struct.pack("<I", 0x80000))]), "below 1 MiB"),
    (make_elf([(0x3F00000, b"x", 0x200000)], 0x3F00000, notes=[(b"Xen", 18, struct.pack("<I", 0x3F00000))]),
     "not inside guest RAM"),
    (make_elf([(0x1000000, b"x", 1)], 0x1000000, notes=[(b"GNU", 3, b"1234")]), "neither a PVH entry note"),
])
def test_bad_elf_rejected(mem, tmp_path, image, reason):
    with pytest.raises(BootError, match=reason):
        load_kernel(mem, write(tmp_path, "vmlinux", image), "")


def test_segment_past_end_of_file(mem, tmp_path):
    image = pvh_elf()
    with pytest.raises(BootError, match="truncated"):
        load_kernel(mem, write(tmp_path, "vmlinux", image[:-200]), "")
