"""bzImage loading checked field by field against Documentation/arch/x86/boot.rst."""
import os
import struct

import pytest

from kvmpy.boot import MODE_LONG64, MODE_PROTECTED32, load_kernel
from kvmpy.boot.e820 import E820_RAM, E820_RESERVED
from kvmpy.boot.layout import CMDLINE_ADDR, ZERO_PAGE_ADDR
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory
from kvmpy.nested.kernel import cache_root

from test_boot_support import make_bzimage, write

MiB = 1 << 20
ZP = ZERO_PAGE_ADDR


@pytest.fixture
def mem():
    m = GuestMemory.create(64 * MiB)
    yield m
    m.close()


def e820_table(mem):
    n = mem.read(ZP + 0x1E8, 1)[0]
    return [struct.unpack_from("<QQI", mem.read(ZP + 0x2D0 + 20 * i, 20)) for i in range(n)]


def test_zero_page_fields(mem, tmp_path):
    payload = bytes(range(256)) * 40
    img = make_bzimage(payload=payload)
    entry = load_kernel(mem, write(tmp_path, "bz", img), "console=ttyS0 quiet")
    assert mem.read(ZP + 0x202, 4) == b"HdrS"
    assert mem.read_u16(ZP + 0x206) == 0x020F                  # version copied from the image
    assert mem.read(ZP + 0x1F1, 1)[0] == 4                     # setup_sects copied
    assert mem.read_u16(ZP + 0x1FE) == 0xAA55
    assert mem.read(ZP + 0x210, 1)[0] == 0xFF                  # type_of_loader: undefined
    assert mem.read(ZP + 0x211, 1)[0] == 0x01 | 0x80           # LOADED_HIGH | CAN_USE_HEAP
    assert mem.read_u16(ZP + 0x224) == 0xFE00                  # heap_end_ptr
    assert mem.read_u32(ZP + 0x228) == CMDLINE_ADDR            # cmd_line_ptr
    assert mem.read_u32(ZP + 0xC8) == 0                        # ext_cmd_line_ptr
    assert mem.read(CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert mem.read_u32(ZP + 0x218) == 0 and mem.read_u32(ZP + 0x21C) == 0   # no initrd
    assert mem.read_u32(ZP + 0x238) == 2047                    # cmdline_size kept
    assert mem.read_u16(ZP + 0x236) == 1                       # xloadflags kept
    assert mem.read_u32(ZP + 0x26C) == 0                       # nothing past the header end
    # relocatable with pref_address 16 MiB that fits: loaded there, code32_start says so
    assert mem.read_u32(ZP + 0x214) == 0x1000000
    assert mem.read(0x1000000, len(payload)) == payload
    assert entry.kind == "bzimage" and entry.mode == MODE_LONG64
    assert entry.rip == 0x1000000 + 0x200 and entry.rsi == ZP
    assert entry.region("kernel").gpa == 0x1000000


def test_e820_in_zero_page(mem, tmp_path):
    load_kernel(mem, write(tmp_path, "bz", make_bzimage()), "")
    assert e820_table(mem) == [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x100000 - 0x9FC00, E820_RESERVED),
                               (0x100000, 63 * MiB, E820_RAM)]
    assert mem.read_u32(ZP + 0x1E0) == 63 * 1024               # alt_mem_k


def test_initrd_highest_fit(mem, tmp_path):
    initrd = bytes([7]) * 10000
    load_kernel(mem, write(tmp_path, "bz", make_bzimage()), "", write(tmp_path, "rd", initrd))
    addr, size = mem.read_u32(ZP + 0x218), mem.read_u32(ZP + 0x21C)
    assert size == len(initrd) and addr % 4096 == 0
    assert addr == (64 * MiB - len(initrd)) // 4096 * 4096     # highest page-aligned fit
    assert addr + size <= 64 * MiB and addr + 4096 + size > 64 * MiB
    assert mem.read(addr, size) == initrd
    assert mem.read_u32(ZP + 0xC0) == 0 and mem.read_u32(ZP + 0xC4) == 0


def test_initrd_respects_initrd_addr_max(mem, tmp_path):
    img = make_bzimage(initrd_addr_max=0x2FFFFFF)
    load_kernel(mem, write(tmp_path, "bz", img), "", write(tmp_path, "rd", b"x" * 5000))
    addr = mem.read_u32(ZP + 0x218)
    assert addr + 5000 - 1 <= 0x2FFFFFF and addr == (0x3000000 - 5000) // 4096 * 4096


def test_initrd_below_hole_with_high_ram(tmp_path):
    with GuestMemory.create(5 << 30) as big:
        entry = load_kernel(big, write(tmp_path, "bz", make_bzimage(initrd_addr_max=0xFFFFFFFF)), "",
                            write(tmp_path, "rd", b"r" * 8192))
        table = e820_table(big)
        assert mem_initrd(big) == (0xC0000000 - 8192, 8192)     # top of RAM below 4 GiB, not above
        assert (1 << 32, 2 << 30, E820_RAM) in table
        assert not any(a < 1 << 32 and a + s > 0xC0000000 for a, s, _ in table)   # hole untouched
        assert entry.region("initrd").end == 0xC0000000


def mem_initrd(m):
    return m.read_u32(ZP + 0x218), m.read_u32(ZP + 0x21C)


def test_non_relocatable_loads_at_1mib(mem, tmp_path):
    payload = b"\xF4" * 4096
    img = make_bzimage(relocatable=0, pref_address=0x100000, payload=payload)
    entry = load_kernel(mem, write(tmp_path, "bz", img), "")
    assert mem.read(0x100000, 4096) == payload and entry.rip == 0x100200


@pytest.mark.parametrize("pref, expected", [(0x1000000, 0x1000000),   # aligned and fits: load there
                                             (0x1100000, 0x100000),    # not 2 MiB aligned: 1 MiB
                                             (0, 0x100000)])           # no preference: 1 MiB
def test_relocatable_load_address(tmp_path, pref, expected):
    with GuestMemory.create(24 * MiB) as m:
        entry = load_kernel(m, write(tmp_path, "bz", make_bzimage(pref_address=pref, init_size=4 * MiB)), "")
        assert entry.region("kernel").gpa == expected and entry.rip == expected + 0x200
        assert m.read_u32(ZP + 0x214) == expected


def test_kernel_must_fit_where_it_will_run(tmp_path):
    """Loaded at 1 MiB, a kernel still decompresses to pref_address: that must be RAM too."""
    with GuestMemory.create(24 * MiB) as m:
        img = make_bzimage(pref_address=0x1100000, init_size=8 * MiB)
        with pytest.raises(BootError, match="not inside guest RAM"):
            load_kernel(m, write(tmp_path, "bz", img), "")


def test_old_protocol_without_xloadflags_uses_32bit_entry(mem, tmp_path):
    img = make_bzimage(version=0x0206, header_end=0x23C, xloadflags=0)
    entry = load_kernel(mem, write(tmp_path, "bz", img), "x")
    assert entry.mode == MODE_PROTECTED32 and entry.rip == 0x100000 and entry.rsi == ZP
    assert entry.cs.selector == 0x10 and entry.ds.selector == 0x18 and entry.cr0 & 0x80000000 == 0
    assert mem.read_u32(ZP + 0x260) == 0                       # init_size is beyond a 2.06 header


@pytest.mark.parametrize("kwargs, reason", [
    (dict(version=0x0205), "too old"),
    (dict(loadflags=0), "LOADED_HIGH"),
    (dict(boot_flag=0x1234), "boot_flag"),
    (dict(syssize=10**6), "truncated"),
    (dict(kernel_alignment=0x300000), "power of two"),
    (dict(init_size=100 * MiB), "not inside guest RAM"),
])
def test_bad_headers_rejected(mem, tmp_path, kwargs, reason):
    path = write(tmp_path, "bad", make_bzimage(**kwargs))
    with pytest.raises(BootError, match=reason) as info:
        load_kernel(mem, path, "")
    assert path in str(info.value)


def test_truncated_inside_setup(mem, tmp_path):
    with pytest.raises(BootError, match="truncated"):
        load_kernel(mem, write(tmp_path, "t", make_bzimage()[:0x600]), "")


def test_cmdline_too_long(mem, tmp_path):
    path = write(tmp_path, "bz", make_bzimage(cmdline_size=16))
    load_kernel(mem, path, "a" * 16)
    with pytest.raises(BootError, match="command line is 17 bytes"):
        load_kernel(mem, path, "a" * 17)


def test_initrd_too_big_and_missing(mem, tmp_path):
    path = write(tmp_path, "bz", make_bzimage())
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(60 * MiB)
    with pytest.raises(BootError, match="do not fit"):
        load_kernel(mem, path, "", str(big))
    with pytest.raises(BootError, match="No such file"):
        load_kernel(mem, path, "", str(tmp_path / "nope"))
    with pytest.raises(BootError, match="No such file"):
        load_kernel(mem, str(tmp_path / "nokernel"), "")


def debian_bzimage() -> str | None:
    """The stock Debian bzImage where the nested harness keeps it (cache_root(): $KVMPY_CACHE or
    the checkout's .cache, whatever the working directory), or None when never fetched."""
    kernels = cache_root() / "kernel"
    found = sorted(kernels.glob("*/boot/vmlinuz-*")) if kernels.is_dir() else []
    return str(found[-1]) if found else None


def test_real_debian_bzimage(tmp_path):
    path = debian_bzimage()
    if path is None:
        # `make test` fetches it before running tier 0 (python -m kvmpy.nested images)
        assert os.environ.get("CI") != "true", f"no Debian kernel under {cache_root()}/kernel in CI"
        pytest.skip(f"no Debian kernel downloaded under {cache_root()} (make nested-images)")
    with GuestMemory.create(256 * MiB) as m:
        entry = load_kernel(m, path, "console=ttyS0", write(tmp_path, "rd", b"\0" * 4096))
        assert entry.mode == MODE_LONG64 and entry.rip == entry.region("kernel").gpa + 0x200
        assert m.read_u16(ZP + 0x206) >= 0x020C and m.read(ZP + 0x210, 1)[0] == 0xFF
        init_size = m.read_u32(ZP + 0x260)
        assert mem_initrd(m)[0] >= entry.region("kernel").gpa + init_size


@pytest.mark.parametrize("header_end", [0x204, 0x230, 0x236, 0x23B])
def test_setup_header_too_short_for_2_06_rejected(mem, tmp_path, header_end):
    """A 2.06 header reaches cmdline_size (0x238..0x23b): a shorter one (jump at 0x200 landing
    early) is refused by name instead of reading the missing fields as zeros."""
    path = write(tmp_path, "short", make_bzimage(version=0x0206, header_end=header_end, xloadflags=0))
    with pytest.raises(BootError, match=f"setup header ends at {header_end:#x}, too short") as info:
        load_kernel(mem, path, "")
    assert path in str(info.value)
    load_kernel(mem, write(tmp_path, "ok", make_bzimage(version=0x0206, header_end=0x23C, xloadflags=0)), "")


def test_syssize_rounding_is_not_truncation(mem, tmp_path):
    """syssize counts 16-byte paragraphs rounded up (tools/build.c), so up to 15 bytes may be
    'missing' from the file; a whole paragraph missing is truncation."""
    payload = b"\x90" * 1049
    load_kernel(mem, write(tmp_path, "bz", make_bzimage(payload=payload)), "")     # syssize 66 = 1056 bytes
    with pytest.raises(BootError, match="truncated"):
        load_kernel(mem, write(tmp_path, "bz", make_bzimage(payload=payload, syssize=67)), "")
