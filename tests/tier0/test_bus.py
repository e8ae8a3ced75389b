"""Bus: ranges, overlap rejection, lookups at the edges, unclaimed accesses."""
import pytest
from hypothesis import given, strategies as st

from kvmpy.devices.bus import Bus
from kvmpy.errors import BusError, KvmpyError


class Recorder:
    def __init__(self, name: str):
        self.name = name
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes([offset & 0xFF]) * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))

    def __repr__(self) -> str:
        return self.name


def test_lookup_offsets_and_edges():
    bus = Bus("pio", 0x10000)
    a, b = Recorder("a"), Recorder("b")
    bus.register(0x3F8, 8, a)
    bus.register(0x400, 1, b)
    assert bus.lookup(0x3F7) is None
    assert bus.lookup(0x3F8) == (a, 0)
    assert bus.lookup(0x3FF) == (a, 7)
    assert bus.lookup(0x400) == (b, 0)
    assert bus.lookup(0x401) is None
    bus.write(0x3FA, b"\x01")
    assert a.writes == [(2, b"\x01")]
    assert bus.read(0x3FC, 2) == b"\x04\x04"


def test_unclaimed_reads_float_high_and_are_counted():
    bus = Bus("pio", 0x10000)
    assert bus.read(0x1234, 4) == b"\xff" * 4
    bus.write(0x1234, b"\x00")
    assert bus.unhandled == 2


@pytest.mark.parametrize("base,length", [(0x3F0, 9), (0x3FF, 1), (0x3F9, 2), (0x3F0, 0x100)])
def test_overlap_rejected_with_both_names(base, length):
    bus = Bus("pio", 0x10000)
    bus.register(0x3F8, 8, Recorder("serial"))
    with pytest.raises(BusError) as e:
        bus.register(base, length, Recorder("intruder"))
    assert "serial" in str(e.value) and "intruder" in str(e.value)
    assert isinstance(e.value, KvmpyError)


@pytest.mark.parametrize("base,length", [(0, 0), (-1, 4), (0xFFFF, 2)])
def test_bad_ranges_rejected(base, length):
    with pytest.raises(BusError):
        Bus("pio", 0x10000).register(base, length, Recorder("x"))


def test_unregister_frees_range():
    bus = Bus("mmio", 1 << 48)
    dev = Recorder("d")
    bus.register(0x1000, 0x1000, dev)
    assert bus.unregister(0x1000) is dev
    assert bus.lookup(0x1800) is None
    bus.register(0x1800, 0x10, dev)
    with pytest.raises(BusError):
        bus.unregister(0x1000)


@given(st.lists(st.tuples(st.integers(0, 0xFFF0), st.integers(1, 0x40)), max_size=30),
       st.integers(0, 0xFFFF))
def test_lookup_matches_a_linear_scan(ranges, probe):
    bus = Bus("pio", 0x10000)
    accepted = []
    for i, (base, length) in enumerate(ranges):
        dev = Recorder(str(i))
        try:
            bus.register(base, length, dev)
        except BusError:
            assert any(b < base + length and base < b + n for b, n, _ in accepted) or base + length > 0x10000
            continue
        accepted.append((base, length, dev))
    expect = [(d, probe - b) for b, n, d in accepted if b <= probe < b + n]
    assert len(expect) <= 1
    assert bus.lookup(probe) == (expect[0] if expect else None)


def test_cached_lookups_follow_registration_changes():
    bus = Bus("mmio", 1 << 32)
    a, b = Recorder("a"), Recorder("b")
    assert bus.read(0x2000, 1) == b"\xff"          # caches the miss
    bus.register(0x2000, 0x100, a)
    assert bus.lookup(0x2000) == (a, 0)           # the miss was forgotten
    bus.unregister(0x2000)
    bus.register(0x1F00, 0x200, b)
    assert bus.lookup(0x2000) == (b, 0x100)


def test_hit_cache_is_bounded():
    from kvmpy.devices import bus as busmod
    bus = Bus("mmio", 1 << 32)
    for addr in range(busmod.HIT_CACHE_LIMIT + 100):
        bus.read(addr, 1)
    assert len(bus._hits) <= busmod.HIT_CACHE_LIMIT
