"""Hostile-guest property test: random port traffic never raises, never grows a buffer past
its bound, and the state after it always survives a state()/restore() round trip."""
import dataclasses

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from kvmpy.devices import debug_exit, i8042, legacy, rtc, serial
from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.errors import StateError

from hypothesis_budget import examples

BACKLOG = 32

op = st.tuples(
    st.sampled_from(["read", "write", "input"]),
    st.integers(0, 9),                       # offset, a little past each register window
    st.integers(1, 4),                       # access size
    st.binary(min_size=1, max_size=4),       # write data / host input
)


class FakeClock:
    def __init__(self):
        self.t = 1.7e9

    def __call__(self):
        self.t += 0.013
        return self.t


def build():
    clock = FakeClock()
    return {
        "serial": serial.Serial16550(RecordingIrqLine(), lambda data: None,
                                     backlog_limit=BACKLOG),
        "i8042": i8042.I8042(lambda: None, RecordingIrqLine(), RecordingIrqLine()),
        "rtc": rtc.CmosRtc(RecordingIrqLine(), clock),
        "debug_exit": debug_exit.DebugExit(lambda code: None),
        "port80": legacy.PostCodePort(),
        "port92": legacy.FastA20Port(lambda: None),
        "port61": legacy.SystemControlPortB(),
    }


def check_bounds(devs):
    s = devs["serial"].state()
    assert len(s.rx_fifo) <= serial.RX_FIFO_SIZE and len(s.backlog) <= BACKLOG
    assert len(devs["i8042"].state().output) <= i8042.OUTPUT_QUEUE_LIMIT
    assert len(devs["rtc"].state().cmos) == rtc.CMOS_SIZE


@settings(max_examples=examples(150), deadline=None)
@given(name=st.sampled_from(sorted(build())), ops=st.lists(op, max_size=120))
def test_random_port_traffic(name, ops):
    devs = build()
    dev = devs[name]
    for kind, offset, size, data in ops:
        if kind == "read":
            assert len(dev.read(offset, size)) == size
        elif kind == "write":
            dev.write(offset, data)
        elif name == "serial":
            devs["serial"].enqueue_input(data * 10)
        elif name == "i8042":
            devs["i8042"].push_keyboard_data(data)
        elif name == "rtc":
            devs["rtc"].poll()
        check_bounds(devs)
    fresh = build()[name]
    snapshot = dev.state()
    fresh.restore(snapshot)
    assert fresh.state() == snapshot


def without_clock(state: object) -> object:
    """The state minus what follows the (fake, ever-advancing) clock between two reads."""
    return dataclasses.replace(state, periodic_remaining_us=0) if isinstance(state, rtc.RtcState) else state


ANY_VALUE = st.one_of(st.none(), st.text(max_size=4), st.floats(allow_nan=True), st.booleans())
HOSTILE_INTS = st.integers(-2**70, 2**70) | st.sampled_from([-1, 0, 1, 255, 256, 2**16, 2**32, 2**63, 2**64])


def hostile_value_for(current: object) -> st.SearchStrategy:
    """Values a stream could carry in place of `current`: the same type out of range (byte
    strings around every bound: empty, one past a FIFO, a page), or another type altogether."""
    if isinstance(current, bool):
        same = st.integers(-1, 2) | st.booleans()
    elif isinstance(current, int):
        same = HOSTILE_INTS
    elif isinstance(current, (bytes, bytearray)):
        lengths = st.sampled_from([0, 1, 15, 16, 17, 31, 32, 33, 64, 65, 127, 128, 129, 255, 256, 257, 600])
        same = lengths.map(lambda n: bytes((i * 37) & 0xFF for i in range(n)))
    elif isinstance(current, (list, tuple)):
        same = st.sampled_from([0, 1, 16, 17, 32, 33, 64, 65, 128, 129, 256, 257, 600]).flatmap(
            lambda n: st.lists(st.integers(0, 255), min_size=n, max_size=n)) | st.lists(HOSTILE_INTS, max_size=4)
    else:
        same = HOSTILE_INTS
    return st.one_of(same, same, same, same, ANY_VALUE, st.binary(max_size=8))


# words a refusal may use instead of the field's name: the part of it that is wrong
FIELD_PARTS = {"cmos": ("A/C", "register")}


def check_hostile_restore(name: str, good: object, field: str, value: object) -> str:
    """restore() of `good` with `field` set to `value` either refuses it with a StateError naming
    the field and leaves the device as it was, or loads exactly that state into a device that
    keeps every bound and round-trips it. Returns "refused" or "accepted"."""
    bad = dataclasses.replace(good, **{field: value})
    devs = build()
    target = devs[name]
    before = target.state()
    try:
        target.restore(bad)
    except StateError as e:
        assert any(word in str(e) for word in (field, *FIELD_PARTS.get(field, ()))), (field, str(e))
        assert target.state() == before, "a refused restore changed the device"
        return "refused"
    check_bounds(devs)
    loaded = target.state()
    assert without_clock(loaded) == without_clock(bad), "an accepted state was not loaded as given"
    again = build()[name]
    again.restore(loaded)
    assert without_clock(again.state()) == without_clock(loaded)
    for offset in range(4):
        assert len(target.read(offset, 1)) == 1   # and it still answers the guest
    return "accepted"


BOUNDARY_LENGTHS = [0, 1, 15, 16, 17, 31, 32, 33, 64, 65, 127, 128, 129, 255, 256, 257, 600]
BOUNDARY_INTS = [-1, 0, 1, 2, 7, 8, 127, 128, 255, 256, 0xFFFF, 0x10000, 2**31, 2**32, 2**63, 2**64, -2**63]
OTHER_TYPES = [None, "x", 1.5, float("nan"), b"\x01", [1], True, False]


@pytest.mark.parametrize("name", sorted(build()))
def test_every_state_field_at_its_boundaries(name):
    """Every field of every device's state, at every boundary value of its type and as other
    types: the same rule as below, exhaustively (random draws can miss one field's bound)."""
    good = build()[name].state()
    for field in dataclasses.fields(good):
        current = getattr(good, field.name)
        if isinstance(current, (bytes, bytearray)):
            values = [bytes((i * 37) & 0xFF for i in range(n)) for n in BOUNDARY_LENGTHS]
        elif isinstance(current, (list, tuple)):
            values = [[i & 0xFF for i in range(n)] for n in BOUNDARY_LENGTHS] + [[-1], [256], [None]]
        else:
            values = BOUNDARY_INTS
        for value in values + OTHER_TYPES:
            check_hostile_restore(name, good, field.name, value)


@settings(max_examples=examples(200), deadline=None)
@given(name=st.sampled_from(sorted(build())), ops=st.lists(op, max_size=30), data=st.data())
def test_hostile_state_is_refused_by_name_or_loaded_whole(name, ops, data):
    """A state reached by random traffic, with one field replaced by anything (each field in
    turn): check_hostile_restore's rule holds."""
    source = build()[name]
    for kind, offset, size, payload in ops:
        if kind == "write":
            source.write(offset, payload)
    good = source.state()
    for field in dataclasses.fields(good):
        value = data.draw(hostile_value_for(getattr(good, field.name)), label=field.name)
        event(f"{name}.{field.name}: {check_hostile_restore(name, good, field.name, value)}")
