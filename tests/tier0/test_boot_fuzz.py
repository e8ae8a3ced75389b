"""Hostile kernel files: random, truncated or corrupted images raise BootError and nothing else."""
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.boot import BootEntry, load_kernel
from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

from test_boot_support import make_bzimage, make_elf, multiboot_header

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
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
        assert isinstance(load_kernel(mem, path, "console=ttyS0", initrd_path), BootEntry)
    except BootError as e:
        assert path in str(e) or (initrd_path is not None and initrd_path in str(e)), str(e)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_images_load(env, name):
    mem, d = env
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(VALID[name])
    entry = load_kernel(mem, path, "console=ttyS0")
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
