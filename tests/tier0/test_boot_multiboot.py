"""Multiboot v1: header search, a.out kludge and ELF images, multiboot_info fields."""
import struct

import pytest

from kvmpy.boot import MODE_PROTECTED32, build_e820, load_kernel
from kvmpy.boot.layout import CMDLINE_ADDR
from kvmpy.boot.multiboot import find_header
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

from test_boot_support import make_elf, multiboot_header, write

MiB = 1 << 20
AOUT = 1 << 16
CODE = b"\xFA\xF4" * 300


def aout_image(prefix=64, flags=AOUT | 3, bss=0x2000, entry_off=0x40, load_end=None):
    """File: `prefix` bytes, the header, code. Header is at 0x100000 + prefix in memory."""
    size = prefix + 32 + len(CODE)
    end = 0x100000 + size if load_end is None else load_end
    hdr = multiboot_header(flags, (0x100000 + prefix, 0x100000, end, end + bss, 0x100000 + entry_off))
    return b"\x90" * prefix + hdr + CODE


@pytest.fixture
def mem():
    m = GuestMemory.create(32 * MiB)
    m.fill(0x100000, 0x4000, 0xCC)
    yield m
    m.close()


def info(mem):
    return struct.unpack("<29I", mem.read(0x6000, 0x74))


def test_aout_kludge(mem, tmp_path):
    image = aout_image()
    entry = load_kernel(mem, write(tmp_path, "mb", image), "serial=1", write(tmp_path, "initrd.img", b"M" * 3000))
    assert entry.kind == "multiboot" and entry.mode == MODE_PROTECTED32
    assert mem.read(0x100000, len(image)) == image
    assert mem.read(0x100000 + len(image), 0x2000) == bytes(0x2000)       # bss zeroed
    assert entry.rip == 0x100040 and entry.rax == 0x2BADB002 and entry.rbx == 0x6000
    assert entry.cr0 & 1 and not entry.cr0 & (1 << 31) and entry.cs.db == 1 and entry.cs.limit == 0xFFFFFFFF
    f = info(mem)
    flags = f[0]
    assert flags & 1 and flags & 4 and flags & 8 and flags & 64 and flags & 512
    assert f[1] == 639 and f[2] == (32 * MiB - MiB) // 1024            # mem_lower, mem_upper (KiB)
    assert f[4] == CMDLINE_ADDR and mem.read(CMDLINE_ADDR, 9) == b"serial=1\0"
    mods_count, mods_addr = f[5], f[6]
    mod_start, mod_end, string, _ = struct.unpack("<4I", mem.read(mods_addr, 16))
    assert mods_count == 1 and mod_end - mod_start == 3000 and mod_start % 4096 == 0
    assert mem.read(mod_start, 3000) == b"M" * 3000 and mem.read(string, 11) == b"initrd.img\0"
    mmap_length, mmap_addr = f[11], f[12]
    expected = build_e820(mem.ranges)
    assert mmap_length == 24 * len(expected)
    got = [struct.unpack("<IQQI", mem.read(mmap_addr + 24 * i, 24)) for i in range(len(expected))]
    assert got == [(20, e.addr, e.size, e.type) for e in expected]
    assert mem.read(f[16], 6) == b"kvmpy\0"                              # boot_loader_name


def test_elf_multiboot_with_high_virtual_addresses(mem, tmp_path):
    text = multiboot_header(3) + CODE
    image = make_elf([(0x200000, text, len(text) + 0x1000)], 0xC0200010, bits=32, vaddr_offset=0xC0000000)
    assert find_header(image) is not None
    entry = load_kernel(mem, write(tmp_path, "mb.elf", image), "")
    assert entry.rip == 0x200010                                  # e_entry translated to physical
    assert mem.read(0x200000, len(text)) == text
    assert info(mem)[0] & 8 == 0                                  # no modules without an initrd


def test_header_search_rules():
    hdr = multiboot_header(0)
    assert find_header(hdr) == 0
    assert find_header(b"\0" * 8 + hdr) == 8
    assert find_header(b"\0" * 2 + hdr) is None                    # not 4-byte aligned
    assert find_header(b"\0" * 8192 + hdr) is None                 # past the first 8 KiB
    bad = bytearray(hdr)
    bad[8] ^= 1
    assert find_header(bytes(bad)) is None                         # checksum wrong


@pytest.mark.parametrize("image, reason", [
    (aout_image(flags=AOUT | 1 << 3), "requires features 0x8"),
    (aout_image(entry_off=0x100000), "entry_addr"),
    (aout_image(load_end=0x1000), "below load_addr"),
    (multiboot_header(AOUT, (0x100000, 0x100010, 0, 0, 0x100010)) + CODE, "above header_addr"),
    (multiboot_header(AOUT, (0x800, 0x800, 0, 0, 0x800)) + CODE, "below 1 MiB"),             # over the GDT
    (multiboot_header(AOUT, (0x9F800, 0x9F800, 0, 0, 0x9F800)) + CODE, "below 1 MiB"),       # the EBDA
    (multiboot_header(AOUT, (0x100000, 0x100000, 0, 0x3000000, 0x100000)) + CODE, "not inside guest RAM"),
    (multiboot_header(AOUT, (0x100000, 0x100000, 0x200000, 0, 0x100000)) + CODE, "truncated"),
    (multiboot_header(0) + CODE, "not ELF"),
    (b"\0" * 100, "not a kernel"),
])
def test_bad_multiboot_rejected(mem, tmp_path, image, reason):
    with pytest.raises(BootError, match=reason):
        load_kernel(mem, write(tmp_path, "mb", image), "")


def test_elf_segment_below_1mib_moves_the_tables_above_the_kernel(mem, tmp_path):
    """16-bit test code at 0x8000 (over kvmpy's usual multiboot_info, memory map and stack) and
    the rest at 1 MiB: the tables go above the kernel instead of being refused."""
    low = b"\xEA" * 0x2000                                           # 0x8000..0x9fff
    text = multiboot_header(3) + CODE
    image = make_elf([(0x100000, text, len(text)), (0x8000, low, 0x3000)], 0x100000, bits=32)
    entry = load_kernel(mem, write(tmp_path, "mb.elf", image), "low=1", write(tmp_path, "m.img", b"M" * 100))
    assert mem.read(0x8000, 0x2000) == low and mem.read(0xA000, 0x1000) == bytes(0x1000)
    info_addr = entry.rbx
    assert info_addr >= 0x100000 + len(text)
    f = struct.unpack("<29I", mem.read(info_addr, 0x74))
    assert mem.read(f[4], 6) == b"low=1\0" and f[4] > info_addr
    mod_start, mod_end, string, _ = struct.unpack("<4I", mem.read(f[6], 16))
    assert mem.read(mod_start, 100) == b"M" * 100 and mem.read(string, 6) == b"m.img\0"
    spans = sorted((r.gpa, r.end) for r in entry.regions if r.size)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))       # nothing overlaps


def test_several_modules_as_qemu_takes_them(mem, tmp_path):
    image = aout_image()
    a, b = write(tmp_path, "a.bin", b"A" * 5000), write(tmp_path, "b,c.bin", b"B" * 10)
    entry = load_kernel(mem, write(tmp_path, "mb", image), "", f"{a} arg1 arg2,{b.replace(',', ',,')}")
    f = info(mem)
    assert f[0] & 8 and f[5] == 2
    mods = [struct.unpack("<4I", mem.read(f[6] + 16 * i, 16)) for i in range(2)]
    assert [mem.read(s, e - s) for s, e, _, _ in mods] == [b"A" * 5000, b"B" * 10]
    assert mods[0][1] <= mods[1][0] and all(s % 4096 == 0 for s, _, _, _ in mods)
    assert mem.read(mods[0][2], 16) == b"a.bin arg1 arg2\0" and mem.read(mods[1][2], 8) == b"b,c.bin\0"
    assert entry.region("initrd").size == 5000


def test_several_modules_are_for_multiboot_only(mem, tmp_path):
    pvh = make_elf([(0x1000000, b"\xF4" * 16, 0x1000)], 0x1000000,
                   notes=[(b"Xen", 18, struct.pack("<Q", 0x1000000))])
    a, b = write(tmp_path, "a", b"A"), write(tmp_path, "b", b"B")
    with pytest.raises(BootError, match="only multiboot kernels"):
        load_kernel(mem, write(tmp_path, "pvh", pvh), "", f"{a},{b}")
