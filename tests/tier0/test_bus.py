"""Bus: ranges, overlap rejection, lookups at the edges, unclaimed accesses."""
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices.bus import Bus
from kvmpy.errors import BusError, KvmpyError

from hypothesis_budget import examples


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


class BusModel:
    """The bus as a plain list of claimed ranges: what every lookup must answer."""

    def __init__(self, limit: int):
        self.limit = limit
        self.ranges: list[tuple[int, int, Recorder]] = []   # (base, end, device)

    def accepts(self, base: int, length: int) -> bool:
        end = base + length
        return (length > 0 and base >= 0 and end <= self.limit
                and not any(b < end and base < e for b, e, _ in self.ranges))

    def lookup(self, addr: int):
        hits = [(d, addr - b) for b, e, d in self.ranges if b <= addr < e]
        assert len(hits) <= 1
        return hits[0] if hits else None

    def probes(self) -> set[int]:
        """Every edge of every range (and just outside it), and both ends of the bus."""
        edges = {0, self.limit - 1}
        for b, e, _ in self.ranges:
            edges |= {b - 1, b, b + 1, e - 2, e - 1, e}
        return {a for a in edges if 0 <= a < self.limit}


LIMIT = 0x100
bus_op = st.one_of(
    st.tuples(st.just("register"), st.integers(-2, LIMIT + 2), st.integers(-1, 0x30)),
    st.tuples(st.just("register"), st.integers(-2, LIMIT + 2), st.integers(-1, 0x30)),
    st.tuples(st.just("unregister"), st.integers(-1, LIMIT), st.booleans()),
    st.tuples(st.just("access"), st.integers(0, LIMIT - 1), st.booleans()),
)


@settings(max_examples=examples(300))
@given(ops=st.lists(bus_op, max_size=40), probes=st.lists(st.integers(0, LIMIT - 1), max_size=8))
def test_every_lookup_matches_a_model_of_the_address_space(ops, probes):
    """Accepted and refused registrations, unregistrations and every lookup (cached or not) agree
    with a list of ranges: a wrongly accepted overlap is caught when it is registered."""
    bus, model = Bus("pio", LIMIT), BusModel(LIMIT)
    for n, op in enumerate(ops):
        kind = op[0]
        if kind == "register":
            _, base, length = op
            dev = Recorder(f"d{n}")
            if model.accepts(base, length):
                bus.register(base, length, dev)
                model.ranges.append((base, base + length, dev))
            else:
                with pytest.raises(BusError):
                    bus.register(base, length, dev)
        elif kind == "unregister":
            _, base, pick_existing = op
            if pick_existing and model.ranges:
                base = model.ranges[base % len(model.ranges)][0]
            claimed = [r for r in model.ranges if r[0] == base]
            if claimed:
                assert bus.unregister(base) is claimed[0][2]
                model.ranges.remove(claimed[0])
            else:
                with pytest.raises(BusError):
                    bus.unregister(base)
        else:
            _, addr, write = op
            hit = model.lookup(addr)
            if write:
                bus.write(addr, b"\x5a")
                if hit is not None:
                    assert hit[0].writes[-1] == (hit[1], b"\x5a")
            else:
                assert bus.read(addr, 1) == (bytes([hit[1] & 0xFF]) if hit else b"\xff")
        for addr in sorted(model.probes() | set(probes)):
            assert bus.lookup(addr) == model.lookup(addr), (op, hex(addr))
        assert bus.devices() == sorted(model.ranges, key=lambda r: r[0])


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
