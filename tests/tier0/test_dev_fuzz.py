"""Hostile-guest property test: random port traffic never raises, never grows a buffer past
its bound, and the state after it always survives a state()/restore() round trip."""
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.devices import debug_exit, i8042, legacy, rtc, serial
from kvmpy.devices.irq import RecordingIrqLine

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


@settings(max_examples=150, deadline=None)
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
