"""PCI bus 0 through ports 0xCF8/0xCFC: IDs, absent slots, BAR sizing and moves, capabilities,
MSI-X masking (no /dev/kvm)."""
import struct

import pytest

from kvmpy.devices.bus import Bus
from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.devices.pci import BarAllocator, MsixCapability, PciFunction, PciRoot
from kvmpy.devices.pci.config import CMD_INTX_DISABLE, CMD_MEMORY, PCI_COMMAND
from kvmpy.errors import ConfigError, StateError


class RecordingSink:
    def __init__(self):
        self.messages = []

    def signal_msi(self, address, data):
        self.messages.append((address, data))


class Dummy(PciFunction):
    def __init__(self, sink=None):
        super().__init__("dummy", 0x1234, 0x5678, 0x020000, revision=3, irq_pin=1)
        self.add_bar(0, 0x4000, is64=True)
        self.add_bar(2, 0x1000, is64=False)
        self.msix = MsixCapability(self, 4, 0, 0x2000, 0x3000, sink)
        self.writes = []

    def bar_read(self, index, offset, size):
        if index == 0 and 0x2000 <= offset < 0x2040:
            return self.msix.table_read(offset - 0x2000, size)
        if index == 0 and offset >= 0x3000:
            return self.msix.pba_read(offset - 0x3000, size)
        return bytes(size)

    def bar_write(self, index, offset, data):
        if index == 0 and 0x2000 <= offset < 0x2040:
            self.msix.table_write(offset - 0x2000, data)
        else:
            self.writes.append((index, offset, data))

    def _config_written(self, offset, size, value):
        self.msix.control_written()


def cfg_read(root, dev, reg, size=4):
    root.write(0, struct.pack("<I", 0x8000_0000 | dev << 11 | (reg & 0xFC)))
    return int.from_bytes(root.read(4 + (reg & 3), size), "little")


def cfg_write(root, dev, reg, value, size=4):
    root.write(0, struct.pack("<I", 0x8000_0000 | dev << 11 | (reg & 0xFC)))
    root.write(4 + (reg & 3), value.to_bytes(size, "little"))


@pytest.fixture
def setup():
    mmio = Bus("mmio", 1 << 48)
    moves = []
    root = PciRoot(mmio, on_bar_moved=lambda f, i, old, new: moves.append((i, old, new)))
    sink = RecordingSink()
    dev = Dummy(sink)
    line = RecordingIrqLine()
    slot = root.add(dev, intx=line, gsi=11)
    return root, dev, slot, mmio, moves, sink, line


def test_host_bridge_and_absent_functions(setup):
    root, dev, slot, *_ = setup
    assert cfg_read(root, 0, 0) == 0x1237_8086
    assert cfg_read(root, 0, 0x08) >> 8 == 0x060000
    assert cfg_read(root, 7, 0, 2) == 0xFFFF
    root.write(0, struct.pack("<I", 0x8001_0000))  # bus 1
    assert root.read(4, 4) == b"\xff" * 4
    root.write(0, struct.pack("<I", 0x0000_0000 | slot << 11))  # enable bit clear
    assert root.read(4, 2) == b"\xff\xff"
    assert cfg_read(root, slot, 0) == 0x5678_1234
    assert cfg_read(root, slot, 2, 2) == 0x5678 and cfg_read(root, slot, 3, 1) == 0x56
    assert cfg_read(root, slot, 0x3D, 1) == 1 and cfg_read(root, slot, 0x3C, 1) == 11
    assert root.intx_routes[0].slot == slot and root.intx_routes[0].gsi == 11


def test_ids_are_read_only(setup):
    root, dev, slot, *_ = setup
    cfg_write(root, slot, 0, 0xFFFF_FFFF)
    assert cfg_read(root, slot, 0) == 0x5678_1234


def test_bars_placed_in_hole_and_decoded(setup):
    root, dev, slot, mmio, moves, *_ = setup
    a0, a2 = dev.bar_address(0), dev.bar_address(2)
    assert 0xC000_0000 <= a0 < 0xFEC0_0000 and a0 % 0x4000 == 0 and a2 % 0x1000 == 0
    assert cfg_read(root, slot, PCI_COMMAND, 2) & CMD_MEMORY
    assert mmio.lookup(a0 + 0x10)[1] == 0x10
    mmio.write(a2 + 8, b"\x01\x02")
    assert dev.writes == [(2, 8, b"\x01\x02")]


def test_bar_sizing_protocol_64bit(setup):
    root, dev, slot, mmio, moves, *_ = setup
    old = dev.bar_address(0)
    cfg_write(root, slot, PCI_COMMAND, 0, 2)  # Linux turns decoding off while sizing
    assert mmio.lookup(old) is None
    cfg_write(root, slot, 0x10, 0xFFFF_FFFF)
    cfg_write(root, slot, 0x14, 0xFFFF_FFFF)
    low, high = cfg_read(root, slot, 0x10), cfg_read(root, slot, 0x14)
    assert low == 0xFFFF_C004 and high == 0xFFFF_FFFF
    size = ~((high << 32) | (low & ~0xF)) + 1 & (2**64 - 1)
    assert size == 0x4000
    cfg_write(root, slot, 0x10, 0xD000_0000)
    cfg_write(root, slot, 0x14, 0)
    cfg_write(root, slot, PCI_COMMAND, CMD_MEMORY, 2)
    assert dev.bar_address(0) == 0xD000_0000
    assert mmio.lookup(0xD000_0000) is not None and mmio.lookup(old) is None
    assert (0, None, 0xD000_0000) in moves[-2:]
    assert cfg_read(root, slot, 0x30) == 0  # no expansion ROM


def test_bar_sizing_32bit(setup):
    root, dev, slot, *_ = setup
    cfg_write(root, slot, 0x18, 0xFFFF_FFFF)
    assert cfg_read(root, slot, 0x18) == 0xFFFF_F000


def test_bar_over_another_device_is_left_unmapped(setup):
    root, dev, slot, mmio, moves, *_ = setup
    other = dev.bar_address(2)
    cfg_write(root, slot, PCI_COMMAND, 0, 2)
    cfg_write(root, slot, 0x10, other & ~0x3FFF)  # overlaps BAR2 once both decode
    cfg_write(root, slot, PCI_COMMAND, CMD_MEMORY, 2)
    assert mmio.lookup(other) is not None  # no exception escaped, one of them decodes


def test_capability_walk(setup):
    root, dev, slot, *_ = setup
    assert cfg_read(root, slot, 0x06, 2) & 0x10
    ptr = cfg_read(root, slot, 0x34, 1)
    ids = []
    while ptr:
        ids.append(cfg_read(root, slot, ptr, 1))
        ptr = cfg_read(root, slot, ptr + 1, 1)
    assert ids == [0x11]


def test_msix_masking_and_pending(setup):
    root, dev, slot, mmio, moves, sink, line = setup
    cap = dev.msix.cap_offset
    assert cfg_read(root, slot, cap + 2, 2) == 3  # table size - 1
    assert cfg_read(root, slot, cap + 4) == 0x2000 and cfg_read(root, slot, cap + 8) == 0x3000
    assert not dev.msix.notify(1)  # disabled: caller uses INTx
    cfg_write(root, slot, cap + 2, 0x8000 | 0x4000, 2)  # enable + function mask
    base = dev.bar_address(0) + 0x2000 + 16
    mmio.write(base, struct.pack("<Q", 0xFEE0_1000))
    mmio.write(base + 8, struct.pack("<I", 0x31))
    assert dev.msix.notify(1) and sink.messages == []  # vector masked (reset state) and function masked
    mmio.write(base + 12, struct.pack("<I", 0))  # unmask vector: function mask still holds it
    assert sink.messages == [] and mmio.read(dev.bar_address(0) + 0x3000, 8)[0] == 0b10
    cfg_write(root, slot, cap + 2, 0x8000, 2)  # drop function mask: the pending message goes out
    assert sink.messages == [(0xFEE0_1000, 0x31)] and dev.msix.pending == 0
    dev.msix.notify(1)
    assert len(sink.messages) == 2
    assert mmio.read(base + 12, 4) == b"\x00" * 4
    mmio.write(base + 12, struct.pack("<I", 0xFFFF_FFFF))  # only the mask bit is writable
    assert mmio.read(base + 12, 4) == b"\x01\x00\x00\x00"


def test_msix_vector_change_callback(setup):
    root, dev, slot, mmio, moves, sink, line = setup
    seen = []
    dev.msix.on_vector_changed = lambda v, vec: seen.append((v, vec.address, vec.data, vec.masked))
    dev.bar_write(0, 0x2000 + 32 + 8, struct.pack("<I", 0x77))
    assert seen == [(2, 0, 0x77, True)]
    dev.bar_write(0, 0x2000 + 32 + 8, b"\x77")  # byte writes are ignored
    assert len(seen) == 1


def test_intx_disable_bit(setup):
    root, dev, slot, mmio, moves, sink, line = setup
    dev.set_intx(True)
    assert line.level and cfg_read(root, slot, 0x06, 2) & 0x08
    cfg_write(root, slot, PCI_COMMAND, CMD_MEMORY | CMD_INTX_DISABLE, 2)
    assert not line.level and cfg_read(root, slot, 0x06, 2) & 0x08
    cfg_write(root, slot, PCI_COMMAND, CMD_MEMORY, 2)
    assert line.level


def test_state_round_trip(setup):
    root, dev, slot, *_ = setup
    cfg_write(root, slot, 0x3C, 5, 1)
    s, ms = dev.state(), dev.msix.state()
    other = Dummy()
    other.restore(s)
    other.msix.restore(ms)
    assert other.state() == s and other.msix.state() == ms
    bad = bytearray(s.config)
    bad[0] ^= 1
    with pytest.raises(StateError):
        other.restore(type(s)(bytes(bad)))
    with pytest.raises(StateError):
        other.msix.restore(type(ms)(ms.table[:-1], 0))


def test_allocator_bounds():
    a = BarAllocator(0xC000_0000, 0xC000_8000)
    assert a.allocate(0x1000) == 0xC000_0000
    assert a.allocate(0x4000) == 0xC000_4000
    with pytest.raises(ConfigError):
        a.allocate(0x1000)
