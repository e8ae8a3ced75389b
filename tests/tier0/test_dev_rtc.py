"""CMOS RTC against a fixed, injected clock."""
from datetime import datetime, timezone

import pytest

from kvmpy.devices import rtc as r
from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.errors import StateError

# Sunday 2024-03-10 15:04:05 UTC
T0 = datetime(2024, 3, 10, 15, 4, 5, tzinfo=timezone.utc).timestamp()


class Clock:
    def __init__(self, t=T0 + 0.25):
        self.t = t

    def __call__(self):
        return self.t


def make():
    clock, irq = Clock(), RecordingIrqLine()
    return r.CmosRtc(irq, clock), clock, irq


def get(dev, reg):
    dev.write(0, bytes((reg,)))
    return dev.read(1, 1)[0]


def put(dev, reg, val):
    dev.write(0, bytes((reg,)))
    dev.write(1, bytes((val,)))


def test_bcd_24h_default():
    dev, clock, irq = make()
    assert [get(dev, x) for x in (r.SECONDS, r.MINUTES, r.HOURS, r.WEEKDAY, r.DAY, r.MONTH,
                                  r.YEAR, r.CENTURY)] == [0x05, 0x04, 0x15, 1, 0x10, 0x03,
                                                          0x24, 0x20]
    assert get(dev, r.REG_D) == r.D_VRT
    assert get(dev, r.REG_B) == r.B_24H


def test_binary_and_12h_modes():
    dev, clock, irq = make()
    put(dev, r.REG_B, r.B_BINARY)            # binary, 12 hour
    assert get(dev, r.HOURS) == 0x80 | 3      # 3 PM
    assert get(dev, r.SECONDS) == 5 and get(dev, r.YEAR) == 24
    put(dev, r.REG_B, 0)                      # BCD, 12 hour
    clock.t = T0 - 15 * 3600                  # 00:04:05 -> 12 AM
    assert get(dev, r.HOURS) == 0x12


def test_nmi_bit_in_index_is_ignored():
    dev, clock, irq = make()
    dev.write(0, bytes((0x80 | r.MINUTES,)))
    assert dev.read(1, 1)[0] == 0x04
    assert dev.state().nmi_disabled
    assert dev.read(0, 1) == b"\xff"


def test_uip_window():
    dev, clock, irq = make()
    assert not get(dev, r.REG_A) & r.A_UIP
    clock.t = T0 + 0.9999
    assert get(dev, r.REG_A) & r.A_UIP
    assert get(dev, r.REG_A) & 0x7F == r.A_DEFAULT


def test_guest_sets_time_with_set_bit_and_clock_keeps_running():
    dev, clock, irq = make()
    put(dev, r.REG_B, r.B_SET | r.B_24H)
    clock.t += 5                              # frozen while SET
    assert get(dev, r.SECONDS) == 0x05
    put(dev, r.YEAR, 0x30)
    put(dev, r.HOURS, 0x23)
    put(dev, r.REG_B, r.B_24H)
    assert get(dev, r.YEAR) == 0x30 and get(dev, r.HOURS) == 0x23
    clock.t += 60
    assert get(dev, r.MINUTES) == 0x05
    # Direct write without SET changes just that field.
    put(dev, r.MINUTES, 0x59)
    assert get(dev, r.MINUTES) == 0x59 and get(dev, r.HOURS) == 0x23


def test_invalid_guest_time_is_rejected():
    dev, clock, irq = make()
    before = dev.state().offset_s
    put(dev, r.MONTH, 0x13)                   # month 13
    put(dev, r.SECONDS, 0xAA)                 # not BCD
    assert dev.state().offset_s == before
    assert get(dev, r.MONTH) == 0x03


def test_update_alarm_and_periodic_interrupts():
    dev, clock, irq = make()
    get(dev, r.REG_C)                         # clear
    put(dev, r.REG_B, r.B_24H | r.B_UIE)
    dev.poll()
    assert not irq.level
    clock.t += 1
    dev.poll()
    assert irq.level
    c = get(dev, r.REG_C)
    assert c & r.C_IRQF and c & r.C_UF
    assert not irq.level and get(dev, r.REG_C) == 0
    # Alarm at hh:04:15 with "don't care" hours.
    put(dev, r.REG_B, r.B_24H | r.B_AIE)
    put(dev, r.SECONDS_ALARM, 0x15)
    put(dev, r.MINUTES_ALARM, 0x04)
    put(dev, r.HOURS_ALARM, 0xFF)
    clock.t = T0 + 9.5
    dev.poll()
    assert not irq.level
    clock.t = T0 + 10.5
    dev.poll()
    assert irq.level and get(dev, r.REG_C) & r.C_AF
    # Periodic at 1024 Hz.
    put(dev, r.REG_B, r.B_24H | r.B_PIE)
    assert dev.poll_interval() == pytest.approx(1 / 1024)
    clock.t += 0.002
    dev.poll()
    assert irq.level and get(dev, r.REG_C) & r.C_PF


def test_memory_size_bytes():
    dev, clock, irq = make()
    dev.set_memory_size(3 << 30, 2 << 30)
    w = lambda reg: get(dev, reg) | get(dev, reg + 1) << 8
    assert w(0x15) == 640
    assert w(0x17) == w(0x30) == 0xFFFF
    assert w(0x34) == ((3 << 30) - (16 << 20)) >> 16
    assert get(dev, 0x5B) | get(dev, 0x5C) << 8 | get(dev, 0x5D) << 16 == (2 << 30) >> 16
    dev.set_memory_size(32 << 20, 0)
    assert w(0x17) == 31 * 1024 and w(0x34) == 256
    total = sum(get(dev, i) for i in range(0x10, 0x2E))
    assert (get(dev, 0x2E) << 8 | get(dev, 0x2F)) == total


def test_cmos_ram_is_plain_storage_and_c_d_read_only():
    dev, clock, irq = make()
    put(dev, 0x40, 0x5A)
    assert get(dev, 0x40) == 0x5A
    put(dev, r.REG_D, 0)
    assert get(dev, r.REG_D) == r.D_VRT
    put(dev, r.REG_A, 0xFF)
    assert get(dev, r.REG_A) == 0x7F


def test_state_round_trip():
    dev, clock, irq = make()
    put(dev, r.YEAR, 0x31)
    put(dev, 0x50, 7)
    put(dev, r.REG_B, r.B_24H | r.B_UIE)
    clock.t += 1
    dev.poll()
    st = dev.state()
    irq2 = RecordingIrqLine()
    other = r.CmosRtc(irq2, clock)
    other.restore(st)
    assert other.state() == st
    assert irq2.level
    assert get(other, r.YEAR) == 0x31 and get(other, 0x50) == 7


@pytest.mark.parametrize("bad", [
    dict(cmos=b"\0" * 127), dict(index=128), dict(offset_s=float("nan")),
    dict(offset_s=1e12), dict(cmos=b"\0" * 12 + b"\x01" + b"\0" * 115),
    dict(nmi_disabled=1),
])
def test_restore_rejects_bad_state(bad):
    dev, *_ = make()
    with pytest.raises(StateError):
        dev.restore(r.RtcState(**bad))
