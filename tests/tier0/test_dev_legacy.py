"""Debug-exit, port 0x80, 0x92, 0x61, absent-device sinks and the rate-limited logger."""
import logging

import pytest

from kvmpy.devices import debug_exit as dx
from kvmpy.devices import legacy as lg
from kvmpy.devices.bus import Bus
from kvmpy.errors import StateError
from kvmpy.ratelimit import RateLimitedLog


@pytest.mark.parametrize("data,code", [(b"\x00", 1), (b"\x01", 3), (b"\x10", 33),
                                       (b"\x00\x01", 513), (b"\xff\xff\xff\xff", (1 << 33) - 1)])
def test_debug_exit_codes(data, code):
    codes = []
    dev = dx.DebugExit(codes.append)
    bus = Bus("pio", 0x10000)
    bus.register(dx.DEBUG_EXIT_PORT, dx.DEBUG_EXIT_WIDTH, dev)
    bus.write(dx.DEBUG_EXIT_PORT, data)
    assert codes == [code] == [dx.exit_code_for(int.from_bytes(data, "little"))]
    assert dev.state().last_code == code


def test_debug_exit_ignores_odd_writes_and_round_trips():
    codes = []
    dev = dx.DebugExit(codes.append)
    dev.write(1, b"\x01")
    dev.write(0, b"")
    dev.write(0, b"\x01" * 5)
    assert codes == [] and dev.read(0, 2) == b"\xff\xff"
    dev.write(0, b"\x02")
    other = dx.DebugExit(codes.append)
    other.restore(dev.state())
    assert other.state() == dev.state() == dx.DebugExitState(5)
    for bad in (2, 0, -1, 1 << 40, "3"):
        with pytest.raises(StateError):
            other.restore(dx.DebugExitState(bad))


def test_post_code_port():
    dev = lg.PostCodePort()
    for v in (0x12, 0x34):
        dev.write(0, bytes((v,)))
    assert dev.last_code == 0x34 and dev.writes == 2
    assert dev.read(0, 1) == b"\xff"
    other = lg.PostCodePort()
    other.restore(dev.state())
    assert other.state() == dev.state()
    with pytest.raises(StateError):
        other.restore(lg.PostCodeState(last_code=0x100))


def test_fast_a20_and_reset():
    resets = []
    dev = lg.FastA20Port(lambda: resets.append(1))
    assert dev.a20_enabled and dev.read(0, 1) == b"\x02"
    dev.write(0, b"\x00")
    assert not dev.a20_enabled and resets == []
    dev.write(0, b"\x03")
    assert resets == [1] and dev.a20_enabled
    dev.write(0, b"\x03")                   # no new 0 -> 1 edge
    assert resets == [1]
    other = lg.FastA20Port(lambda: None)
    other.restore(dev.state())
    assert other.state() == dev.state()
    with pytest.raises(StateError):
        other.restore(lg.FastA20State(0x04))


def test_port_61_gate_out2_and_refresh_toggle():
    dev = lg.SystemControlPortB(out2_delay_reads=5)
    a, b = dev.read(0, 1)[0], dev.read(0, 1)[0]
    assert (a ^ b) & lg.REFRESH_TOGGLE       # refresh bit toggles
    assert not a & lg.OUT2                   # gate low: OUT2 low
    dev.write(0, b"\xf3")                    # only low 4 bits stick
    assert dev.state().value == 0x03
    # Linux's calibration loop: while (!(inb(0x61) & 0x20)); must terminate.
    loops = 0
    while not dev.read(0, 1)[0] & lg.OUT2:
        loops += 1
        assert loops < 100
    assert loops == 5
    assert dev.read(0, 1)[0] & lg.OUT2      # stays high (mode 0) until the gate drops
    dev.write(0, b"\x00")
    dev.write(0, b"\x01")
    assert not dev.read(0, 1)[0] & lg.OUT2   # new gate edge restarts the count
    other = lg.SystemControlPortB(out2_delay_reads=5)
    other.restore(dev.state())
    assert other.state() == dev.state()
    with pytest.raises(StateError):
        other.restore(lg.SystemControlBState(value=0x10))
    with pytest.raises(StateError):
        other.restore(lg.SystemControlBState(refresh=1))


def test_probe_sinks_register_cleanly_and_read_all_ones():
    bus = Bus("pio", 0x10000)
    sinks = lg.probe_sinks()
    for base, length, dev in sinks:
        bus.register(base, length, dev)
    bus.register(lg.POST_CODE_PORT, 1, lg.PostCodePort())
    bus.register(0x3F8, 8, lg.ProbeSink("COM1 stand-in"))   # COM1 stays free for the UART
    assert bus.read(0x2FD, 1) == b"\xff"     # COM2 LSR
    bus.write(0x378, b"\x00")
    assert bus.unhandled == 0
    com2 = next(d for b, _, d in sinks if b == 0x2F8)
    assert com2.state() == lg.ProbeSinkState(reads=1, writes=0)
    com2.restore(lg.ProbeSinkState(7, 8))
    assert com2.state() == lg.ProbeSinkState(7, 8)
    with pytest.raises(StateError):
        com2.restore(lg.ProbeSinkState(-1, 0))


def test_rate_limited_log_suppresses_and_reports(caplog):
    now = [0.0]
    rl = RateLimitedLog(logging.getLogger("t.rl"), interval_s=1.0, burst=2, max_keys=2,
                        clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.rl"):
        results = [rl.warning("k", "msg %d", i) for i in range(10)]
        assert results == [True, True] + [False] * 8
        now[0] = 1.0
        assert rl.warning("k", "msg %d", 99)
        for i in range(10):                  # many keys: bounded table
            rl.warning(("other", i), "x")
        assert len(rl._buckets) == 2
    assert "8 similar messages suppressed" in caplog.records[2].getMessage()
    assert [r.getMessage() for r in caplog.records[:2]] == ["msg 0", "msg 1"]
