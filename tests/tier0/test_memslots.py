"""Guest RAM layout, bounds-checked access and dirty-bitmap maths (no /dev/kvm)."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from kvmpy.errors import ConfigError, GuestMemoryError
from kvmpy.memslots import (HOLE_END, HOLE_START, GuestMemory, bitmap_to_pages, pages_to_bitmap,
                            parse_size, ram_ranges)

GiB = 1 << 30


def test_small_ram_is_one_range():
    (r,) = ram_ranges(512 << 20)
    assert (r.slot, r.gpa, r.size, r.offset) == (0, 0, 512 << 20, 0)


def test_large_ram_skips_the_device_hole():
    low, high = ram_ranges(4 * GiB)
    assert low.gpa == 0 and low.end == HOLE_START
    assert high.gpa == HOLE_END and high.size == 4 * GiB - HOLE_START
    assert high.offset == low.size  # contiguous in the memfd


@pytest.mark.parametrize("size", [0, 4095, 1 << 19, (1 << 20) + 1])
def test_bad_sizes_rejected(size):
    with pytest.raises(ConfigError):
        ram_ranges(size)


@pytest.mark.parametrize("text,expect", [("512M", 512 << 20), ("2G", 2 * GiB), ("1024", GiB),
                                          ("64m", 64 << 20), ("1.5G", 3 * GiB // 2), ("4096K", 4 << 20)])
def test_parse_size(text, expect):
    assert parse_size(text) == expect


@pytest.mark.parametrize("text", ["", "lots", "-1G", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_access_and_bounds():
    with GuestMemory.create(2 << 20) as mem:
        mem.write(0x1000, b"abc")
        assert mem.read(0x1000, 3) == b"abc"
        mem.write_u64(0x2000, 0x1122334455667788)
        assert mem.read_u32(0x2000) == 0x55667788
        assert mem.read_u16(0x2006) == 0x1122
        last = mem.size - 8
        mem.write_u64(last, 7)  # exactly the last 8 bytes of RAM
        assert mem.read_u64(last) == 7
        for gpa, n in [(mem.size - 7, 8), (mem.size, 1), (-1, 1), (0, mem.size + 1), (2**64 - 1, 2)]:
            with pytest.raises(GuestMemoryError):
                mem.read(gpa, n)
        with pytest.raises(GuestMemoryError):
            mem.write_u32(mem.size - 2, 1)


def test_views_share_memory_with_the_memfd():
    with GuestMemory.create(1 << 20, backend="memfd") as mem:
        v = mem.view(0x100, 4)
        v[:] = np.frombuffer(b"wxyz", dtype=np.uint8)
        assert mem.read(0x100, 4) == b"wxyz"
        assert bytes(mem.buffer(0x100, 4)) == b"wxyz"
        assert __import__("os").pread(mem.fd, 4, 0x100) == b"wxyz"
        del v


@given(st.sets(st.integers(0, 999), max_size=100))
def test_bitmap_round_trip(pages):
    bm = pages_to_bitmap(sorted(pages), 1000)
    assert bm.dtype == np.uint64 and len(bm) == 16
    assert list(bitmap_to_pages(bm, 1000)) == sorted(pages)


def test_booting_needs_no_numpy(tmp_path):
    """numpy (and every module a bzImage boot without extra devices does not use) costs start-up
    time, seconds of it under nested virtualization; loading a kernel into guest
    RAM (the whole boot path before KVM_RUN) must not pull it in."""
    import subprocess
    import sys

    from test_boot_support import make_bzimage
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage())
    code = ("import sys, kvmpy.machine, kvmpy.cli.boot\n"
            "from kvmpy.memslots import GuestMemory\n"
            "from kvmpy.boot import load_kernel\n"
            "m = GuestMemory.create(64 << 20)\n"
            f"load_kernel(m, {str(kernel)!r}, 'console=ttyS0')\n"
            "heavy = ('numpy', 'json', 'socket', 'kvmpy.boot.elf', 'kvmpy.boot.multiboot',\n"
            "         'kvmpy.boot.pvh', 'kvmpy.devices.virtio.rng', 'kvmpy.devices.virtio.console',\n"
            "         'kvmpy.devices.virtio.blk', 'kvmpy.devices.virtio.queue', 'subprocess', 'shutil')\n"
            "loaded = [m for m in heavy if m in sys.modules]\n"
            "assert not loaded, f'the bzImage boot path imported {loaded}'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("backend", ["memfd", "anon"])
def test_both_backings_behave_alike(backend):
    with GuestMemory.create(8 << 20, backend=backend) as mem:
        assert mem.backend == backend and (mem.fd >= 0) == (backend == "memfd")
        mem.write(0x2000, b"abcd")
        assert mem.read(0x2000, 4) == b"abcd" and isinstance(mem.read(0x2000, 4), bytes)
        assert bytes(mem.buffer(0x2000, 4)) == b"abcd"
        if backend == "anon":  # the aligned window: guest 2 MiB frames on host 2 MiB frames
            assert mem.host_address(0) % (2 << 20) == 0


@pytest.mark.parametrize("text,expect", [("always [within_size] advise never deny force", "memfd"),
                                         ("always within_size [advise] never deny force", "memfd"),
                                         ("always within_size advise [never] deny force", "anon"),
                                         ("garbage", "anon")])
def test_backend_follows_shmem_huge_pages(tmp_path, text, expect):
    from kvmpy.memslots.memory import choose_backend
    f = tmp_path / "shmem_enabled"
    f.write_text(text + "\n")
    assert choose_backend(str(f)) == expect
    assert choose_backend(str(tmp_path / "missing")) == "anon"
