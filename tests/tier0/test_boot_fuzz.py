"""Hostile kernel files: random, truncated or corrupted images raise BootError and nothing else."""
import os
import re
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from kvmpy.boot import MODE_LONG64, MODE_PROTECTED32, BootEntry, load_kernel
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

from hypothesis_budget import examples
from test_boot_support import make_bzimage, make_elf, multiboot_header

SETTINGS = settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
VALID = {
    "bzimage": make_bzimage(payload=b"\x90" * 2048, init_size=0x100000),
    "bzimage32": make_bzimage(version=0x0206, header_end=0x23C, xloadflags=0, payload=b"\x90" * 1024),
    "pvh": make_elf([(0x1000000, b"\xF4" * 512, 0x2000)], 0x1000000,
                    notes=[(b"Xen", 18, struct.pack("<Q", 0x1000000))]),
    "mb-aout": multiboot_header(1 << 16 | 3, (0x100000, 0x100000, 0, 0x100400, 0x100020)) + b"\xF4" * 512,
    "mb-elf": make_elf([(0x100000, multiboot_header(3) + b"\xF4" * 256, 0x1000)], 0x100000, bits=32),
}


@pytest.fixture(scope="module")
def env():
    mem = GuestMemory.create(32 << 20)
    with tempfile.TemporaryDirectory() as d:
        yield mem, d
    mem.close()


CMDLINE = "console=ttyS0"


def check_accepted(mem: GuestMemory, entry: BootEntry, initrd: bytes | None) -> None:
    """What a loader accepted must be bootable as it says: a known kind and mode, every region it
    wrote inside RAM and apart from the others, the command line and initrd really there, and the
    entry point inside the kernel it loaded."""
    assert isinstance(entry, BootEntry)
    assert entry.kind in ("bzimage", "pvh", "multiboot") and entry.mode in (MODE_LONG64, MODE_PROTECTED32)
    for r in entry.regions:
        assert r.size >= 0 and mem.contains(r.gpa, r.size), (r, entry.kind)
    spans = sorted((r.gpa, r.end, r.name) for r in entry.regions if r.size)
    for i, (a0, a1, an) in enumerate(spans):
        for b0, b1, bn in spans[i + 1:]:
            # (an ELF's own PT_LOAD segments overlapping each other are still accepted: noted in
            # issue 14's report; QEMU refuses them)
            assert a1 <= b0 or an == bn == "kernel", f"{an} [{a0:#x}, {a1:#x}) overlaps {bn} [{b0:#x}, {b1:#x})"
    kernel = [r for r in entry.regions if r.name == "kernel" and r.size > 0]
    assert any(r.gpa <= entry.rip < r.end for r in kernel), (hex(entry.rip), kernel)
    cmdline = entry.region("cmdline")
    assert cmdline is not None and mem.read(cmdline.gpa, cmdline.size) == CMDLINE.encode() + b"\0"
    if initrd is not None:
        region = entry.region("initrd")
        assert region is not None and mem.read(region.gpa, region.size) == initrd


def check_refused(error: BootError, *paths: str) -> None:
    """What a loader refused is one line naming the file and saying what is wrong with it."""
    message = str(error)
    assert any(p in message for p in paths if p), message
    assert error.detail and "\n" not in message and len(message) < 500, message


def try_load(env, data: bytes, initrd: bytes | None = None) -> None:
    mem, d = env
    path = os.path.join(d, "kernel")
    with open(path, "wb") as f:
        f.write(data)
    initrd_path = None
    if initrd is not None:
        initrd_path = os.path.join(d, "initrd")
        with open(initrd_path, "wb") as f:
            f.write(initrd)
    try:
        entry = load_kernel(mem, path, CMDLINE, initrd_path)
    except BootError as e:
        event(f"refused: {re.sub(r'0x[0-9a-f]+|[0-9]+', 'N', e.detail or '')[:40]}")
        check_refused(e, path, initrd_path or "")
    else:
        event(f"accepted: {entry.kind}")
        check_accepted(mem, entry, initrd)
    with open(path, "rb") as f:
        assert f.read() == data, "the loader modified its input"


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_images_load(env, name):
    mem, d = env
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(VALID[name])
    entry = load_kernel(mem, path, CMDLINE)
    check_accepted(mem, entry, None)
    assert entry.kind == name.split("-")[0].replace("bzimage32", "bzimage").replace("mb", "multiboot")


@SETTINGS
@given(data=st.binary(max_size=4096),
       prefix=st.sampled_from([b"", b"\x7fELF\x02\x01", b"\x7fELF\x01\x01", multiboot_header(0),
                               multiboot_header(1 << 16)]))
def test_random_bytes(env, data, prefix):
    try_load(env, prefix + data)


@SETTINGS
@given(name=st.sampled_from(sorted(VALID)), cut=st.integers(min_value=0, max_value=20000))
def test_truncated(env, name, cut):
    try_load(env, VALID[name][:cut])


@SETTINGS
@given(name=st.sampled_from(sorted(VALID)),
       edits=st.lists(st.tuples(st.integers(min_value=0, max_value=0x300), st.integers(0, 255)), min_size=1,
                      max_size=8))
def test_corrupted_headers(env, name, edits):
    data = bytearray(VALID[name])
    for pos, value in edits:
        if pos < len(data):
            data[pos] = value
    try_load(env, bytes(data))


@SETTINGS
@given(offset=st.sampled_from([0x1F1, 0x1F4, 0x201, 0x206, 0x211, 0x22C, 0x230, 0x234, 0x236, 0x238, 0x258, 0x260]),
       value=st.integers(min_value=0, max_value=2**64 - 1))
def test_hostile_setup_header_fields(env, offset, value):
    data = bytearray(VALID["bzimage"])
    data[offset:offset + 8] = value.to_bytes(8, "little")
    try_load(env, bytes(data), b"x" * 5000)


SANE = st.integers(0x10, 0x1F).map(lambda k: k << 16)   # 1-2 MiB: where a small kernel goes
ADDRESSES = SANE | SANE | st.sampled_from([0, 0x1000, 0x7000, 0x9000, 0x9FC00, 0xF0000, 0xFFFFF, 0x100000, 0x1000000,
                             (32 << 20) - 0x1000, 32 << 20, 0xFFFFF000, 2**32]) | st.integers(0, 2**32)
SIZES = st.sampled_from([0, 1, 0x200, 0x1000, 0x1000, 0x100000, 32 << 20]) | st.integers(0, 0x20000) | st.integers(0, 2**32)


@SETTINGS
@given(segments=st.lists(st.tuples(ADDRESSES, st.integers(0, 0x400), SIZES), min_size=1, max_size=3),
       entry=ADDRESSES | st.sampled_from([0x100000, 0x100010]) | st.just("first"), flavour=st.sampled_from(["pvh", "multiboot-elf"]),
       initrd=st.none() | st.binary(min_size=1, max_size=64))
def test_hostile_elf_segments_and_entry_points(env, segments, entry, flavour, initrd):
    """ELF kernels whose segments and entry point land anywhere: below 1 MiB over the loader's own
    tables, past RAM, overlapping each other, entry outside every segment."""
    if entry == "first":
        entry = segments[0][0] + segments[0][1] // 2
    if flavour == "pvh":
        segs = [(paddr, b"\xF4" * filesz, max(memsz, filesz)) for paddr, filesz, memsz in segments]
        image = make_elf(segs, entry, notes=[(b"Xen", 18, struct.pack("<Q", entry))])
    else:  # ELF32: addresses are 32 bits
        entry &= 0xFFFFFFFF
        segments = [(paddr & 0xFFFFFFFF, filesz, memsz & 0xFFFFFFFF) for paddr, filesz, memsz in segments]
        first = (segments[0][0], multiboot_header(3) + b"\xF4" * segments[0][1], max(segments[0][2], 12 + segments[0][1]))
        segs = [first] + [(paddr, b"\xF4" * filesz, max(memsz, filesz)) for paddr, filesz, memsz in segments[1:]]
        image = make_elf(segs, entry, bits=32)
    try_load(env, image, initrd)


def test_a_64bit_entry_past_a_tiny_kernel_is_refused(env):
    """Found by test_hostile_setup_header_fields (setup_sects=7 left a 512-byte kernel whose
    64-bit entry at +0x200 lay past its end): refused, naming why."""
    import os
    from kvmpy.boot import load_kernel
    from kvmpy.errors import BootError
    mem, workdir = env
    path = os.path.join(workdir, "tiny-bzimage")
    with open(path, "wb") as f:
        f.write(make_bzimage(payload=b"\x90" * 0x200))
    with pytest.raises(BootError, match="64-bit entry at \\+0x200 lies past the end of the 512-byte"):
        load_kernel(mem, path, "console=ttyS0")
