"""QEMU's fw_cfg as kernels written for QEMU read it: the selector/data ports, the file
directory, DMA (read, skip, select, write refused) and a hostile guest's DMA requests."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices import fw_cfg as fc
from kvmpy.errors import ConfigError
from kvmpy.machine.config import MachineConfig
from kvmpy.memslots import GuestMemory

MiB = 1 << 20
FILES = [("opt/zeta", b"last"), ("opt/alpha", b"first file"), ("etc/empty", b"")]


@pytest.fixture
def mem():
    m = GuestMemory.create(16 * MiB)
    yield m
    m.close()


@pytest.fixture
def dev(mem):
    return fc.FwCfg(mem, fc.build_items(mem.size, 3, FILES))


def read_item(dev: fc.FwCfg, key: int, size: int) -> bytes:
    dev.write(0, key.to_bytes(2, "little"))
    return b"".join(dev.read(1, 1) for _ in range(size))


def directory(dev: fc.FwCfg) -> dict[str, tuple[int, int]]:
    (count,) = struct.unpack(">I", read_item(dev, fc.FW_CFG_FILE_DIR, 4))
    raw = b"".join(dev.read(1, 1) for _ in range(64 * count))
    out = {}
    for i in range(count):
        size, key, _ = struct.unpack_from(">IHH", raw, 64 * i)
        out[raw[64 * i + 8:64 * i + 64].rstrip(b"\0").decode()] = (size, key)
    return out


def dma(dev: fc.FwCfg, mem: GuestMemory, control: int, length: int, target: int, at: int = 0x1000) -> int:
    mem.write(at, fc.DMA_ACCESS.pack(control, length, target))
    dev.write(fc.DMA_OFFSET, (at >> 32).to_bytes(4, "big"))
    dev.write(fc.DMA_OFFSET + 4, (at & 0xFFFF_FFFF).to_bytes(4, "big"))
    return struct.unpack(">I", mem.read(at, 4))[0]


def test_standard_items(dev, mem):
    assert read_item(dev, fc.FW_CFG_SIGNATURE, 4) == b"QEMU"
    assert struct.unpack("<I", read_item(dev, fc.FW_CFG_ID, 4))[0] == fc.FEATURE_TRADITIONAL | fc.FEATURE_DMA
    assert struct.unpack("<Q", read_item(dev, fc.FW_CFG_RAM_SIZE, 8))[0] == 16 * MiB
    assert struct.unpack("<H", read_item(dev, fc.FW_CFG_NB_CPUS, 2))[0] == 3
    assert struct.unpack("<H", read_item(dev, fc.FW_CFG_MAX_CPUS, 2))[0] == 3
    assert read_item(dev, 0x1234, 4) == bytes(4)                  # an unknown key reads as zeros
    assert b"".join(dev.read(fc.DMA_OFFSET + i, 1) for i in range(8)) == b"QEMU CFG"
    assert dev.read(fc.DMA_OFFSET, 4) == b"QEMU"


def test_file_directory_is_sorted_by_name_and_files_read_back(dev):
    d = directory(dev)
    assert list(d) == ["etc/empty", "opt/alpha", "opt/zeta"]
    assert [key for _, key in d.values()] == [0x20, 0x21, 0x22]
    for name, data in FILES:
        size, key = d[name]
        assert size == len(data) and read_item(dev, key, size + 3) == data + b"\0\0\0"   # zeros past the end


def test_dma_select_read_skip(dev, mem):
    _, key = directory(dev)["opt/alpha"]
    assert dma(dev, mem, (key << 16) | fc.DMA_SELECT | fc.DMA_SKIP, 6, 0) == 0
    mem.write(0x2000, b"\xaa" * 16)
    assert dma(dev, mem, fc.DMA_READ, 8, 0x2000) == 0
    assert mem.read(0x2000, 9) == b"file" + bytes(4) + b"\xaa"       # past the end: zeros, no further
    assert dma(dev, mem, (fc.FW_CFG_SIGNATURE << 16) | fc.DMA_SELECT | fc.DMA_READ, 4, 0x3000) == 0
    assert mem.read(0x3000, 4) == b"QEMU"


def test_dma_write_and_out_of_ram_targets_set_the_error_bit(dev, mem):
    assert dma(dev, mem, (0x20 << 16) | fc.DMA_SELECT | fc.DMA_WRITE, 4, 0x2000) == fc.DMA_ERROR
    assert dma(dev, mem, fc.DMA_READ, 0x100, 16 * MiB - 0x80) == fc.DMA_ERROR
    assert dma(dev, mem, fc.DMA_READ, 0xFFFF_FFFF, 0x2000) == fc.DMA_ERROR
    dev.write(fc.DMA_OFFSET + 4, (16 * MiB).to_bytes(4, "big"))     # the access itself outside RAM: ignored


@pytest.fixture(scope="module")
def shared_mem():
    m = GuestMemory.create(16 * MiB)
    yield m
    m.close()


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("sel"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("read"), st.integers(0, 11), st.sampled_from([1, 2, 4])),
    st.tuples(st.just("write"), st.integers(0, 11), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("dma"), st.integers(0, 0xFFFF_FFFF), st.integers(0, 1 << 26), st.integers(0, 1 << 34))),
    max_size=20))
def test_hostile_guest_never_escapes_ram_or_breaks_the_state(ops, shared_mem):
    mem = shared_mem
    dev = fc.FwCfg(mem, fc.build_items(mem.size, 1, FILES))
    for op in ops:
        if op[0] == "sel":
            dev.write(0, op[1].to_bytes(2, "little"))
        elif op[0] == "read":
            assert len(dev.read(op[1], op[2])) == op[2]
        elif op[0] == "write":
            dev.write(op[1], op[2])
        else:
            dma(dev, mem, op[1], op[2], op[3], at=0x4000)
        fc.FwCfg(mem, dev.items).restore(dev.state())   # every reachable state is a valid one


@pytest.mark.parametrize("text, spec", [
    ("name=opt/a,string=hi", fc.FwCfgSpec("opt/a", string="hi")),
    ("name=opt/a,file=x,,y", fc.FwCfgSpec("opt/a", file="x,y")),
])
def test_fw_cfg_option_as_qemu(text, spec):
    assert fc.parse_fw_cfg_spec(text) == spec


@pytest.mark.parametrize("text, reason", [
    ("string=hi", "has no name="), ("name=opt/a", "exactly one of"), ("name=opt/a,file=x,string=y", "exactly one of"),
    ("name=opt/" + "n" * 60 + ",string=x", "longer than 55"), ("name=opt/a,data=x", "expected name="),
])
def test_bad_fw_cfg_options(text, reason):
    with pytest.raises(ConfigError, match=reason):
        fc.parse_fw_cfg_spec(text)


def test_fw_cfg_files_are_checked_inputs(tmp_path):
    kernel = tmp_path / "k"
    kernel.write_bytes(b"k")
    blob = tmp_path / "blob"
    blob.write_bytes(b"payload")
    cfg = MachineConfig(kernel=str(kernel), fw_cfg=[fc.FwCfgSpec("opt/b", file=str(blob))],
                        serial=f"file:{blob}")
    with pytest.raises(ConfigError, match="the --fw-cfg file of opt/b"):
        cfg.validate()
    assert blob.read_bytes() == b"payload"
    with pytest.raises(ConfigError, match="it is a directory"):
        MachineConfig(kernel=str(kernel), fw_cfg=[fc.FwCfgSpec("opt/d", file=str(tmp_path))]).validate()
    with pytest.raises(ConfigError, match="given twice"):
        MachineConfig(kernel=str(kernel), fw_cfg=[fc.FwCfgSpec("opt/x", string="1"),
                                                  fc.FwCfgSpec("opt/x", string="2")]).validate()
    assert fc.load_fw_cfg_files([fc.FwCfgSpec("opt/b", file=str(blob)), fc.FwCfgSpec("opt/s", string="é")]) == \
        [("opt/b", b"payload"), ("opt/s", "é".encode())]
