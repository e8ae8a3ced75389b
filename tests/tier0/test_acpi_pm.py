"""ACPI PM register block: S5 power-off and reset callbacks, register semantics the way ACPICA
drives them, the PM timer, hostile accesses and the state round trip."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices.acpi_pm import (PM1_CNT_OFFSET, PM1_EN_OFFSET, PM1_STS_OFFSET, PM_BLOCK_LENGTH,
                                   PM_TIMER_HZ, PM_TMR_OFFSET, RESET_OFFSET, RESET_VALUE, S5_SLEEP_TYPE,
                                   SCI_EN, SLP_EN, AcpiPm, AcpiPmState)
from kvmpy.errors import StateError


class FakeClock:
    def __init__(self) -> None:
        self.ns = 10_000_000_000

    def __call__(self) -> int:
        return self.ns


@pytest.fixture
def events():
    return []


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def pm(events, clock):
    return AcpiPm(on_poweroff=lambda: events.append("off"), on_reset=lambda: events.append("reset"),
                  clock_ns=clock)


def u16(pm: AcpiPm, offset: int) -> int:
    return struct.unpack("<H", pm.read(offset, 2))[0]


def test_acpica_s5_sequence_powers_off_on_the_slp_en_write_only(pm, events):
    cnt = u16(pm, PM1_CNT_OFFSET)
    assert cnt & SCI_EN, "no SMI_CMD in the FADT: SCI_EN must read as set"
    pm.write(PM1_STS_OFFSET, struct.pack("<H", 0xFFFF))             # clear WAK_STS and friends
    typed = (cnt & ~(0x7 << 10) & ~SLP_EN) | (S5_SLEEP_TYPE << 10)
    pm.write(PM1_CNT_OFFSET, struct.pack("<H", typed))                # write #1: SLP_TYP only
    assert events == []
    pm.write(PM1_CNT_OFFSET, struct.pack("<H", typed | SLP_EN))       # write #2: + SLP_EN
    assert events == ["off"]
    assert u16(pm, PM1_CNT_OFFSET) & SLP_EN == 0, "SLP_EN is write-only"
    assert (u16(pm, PM1_CNT_OFFSET) >> 10) & 7 == S5_SLEEP_TYPE


@pytest.mark.parametrize("sleep_type", [t for t in range(8) if t != S5_SLEEP_TYPE])
def test_other_sleep_types_are_refused(pm, events, sleep_type):
    pm.write(PM1_CNT_OFFSET, struct.pack("<H", SCI_EN | (sleep_type << 10) | SLP_EN))
    assert events == []


def test_slp_en_in_a_byte_write_to_the_high_half(pm, events):
    pm.write(PM1_CNT_OFFSET + 1, bytes([(S5_SLEEP_TYPE << 2) | (SLP_EN >> 8)]))
    assert events == ["off"]


def test_reset_register(pm, events):
    pm.write(RESET_OFFSET, bytes([0x02]))
    assert events == []
    pm.write(RESET_OFFSET, bytes([RESET_VALUE]))
    assert events == ["reset"]
    assert pm.read(RESET_OFFSET, 1) == b"\x00"


def test_status_is_write_one_to_clear_and_enable_is_masked(pm):
    pm.restore(AcpiPmState(pm1_status=0x8001, pm1_enable=0, pm1_control=SCI_EN, timer=0))
    pm.write(PM1_STS_OFFSET, struct.pack("<H", 0x0001))
    assert u16(pm, PM1_STS_OFFSET) == 0x8000
    pm.write(PM1_STS_OFFSET, struct.pack("<H", 0x0000))
    assert u16(pm, PM1_STS_OFFSET) == 0x8000
    pm.write(PM1_EN_OFFSET, struct.pack("<H", 0xFFFF))
    assert u16(pm, PM1_EN_OFFSET) == 0x0721
    pm.write(PM1_STS_OFFSET, struct.pack("<I", 0x0000_8000))           # dword: status + enable = 0
    assert u16(pm, PM1_STS_OFFSET) == 0 and u16(pm, PM1_EN_OFFSET) == 0


def test_pm_timer_counts_at_3_58_mhz_and_wraps_at_24_bits(pm, clock):
    t0 = struct.unpack("<I", pm.read(PM_TMR_OFFSET, 4))[0]
    clock.ns += 1_000_000_000
    t1 = struct.unpack("<I", pm.read(PM_TMR_OFFSET, 4))[0]
    assert (t1 - t0) & 0xFFFFFF == PM_TIMER_HZ & 0xFFFFFF
    assert t1 < 1 << 24
    pm.write(PM_TMR_OFFSET, b"\x00\x00\x00\x00")                       # read-only
    assert struct.unpack("<I", pm.read(PM_TMR_OFFSET, 4))[0] == t1


@pytest.mark.parametrize("offset,size", [(-1, 1), (PM_BLOCK_LENGTH, 1), (PM_BLOCK_LENGTH - 1, 2),
                                         (0, 3), (0, 8), (0, 0)])
def test_bad_accesses_read_ones_and_write_nothing(pm, events, offset, size):
    before = pm.state()
    assert pm.read(offset, size) == b"\xff" * max(size, 0)
    pm.write(offset, b"\xff" * max(size, 0))
    assert events == [] and pm.state() == before


def test_state_round_trip_keeps_registers_and_timer(pm, clock, events):
    pm.write(PM1_EN_OFFSET, struct.pack("<H", 0x0100))
    pm.write(PM1_CNT_OFFSET, struct.pack("<H", SCI_EN | (3 << 10)))
    clock.ns += 123_456_789
    saved = pm.state()
    other = AcpiPm(on_poweroff=lambda: None, on_reset=lambda: None, clock_ns=clock)
    other.restore(saved)
    assert other.state() == saved
    clock.ns += 1_000_000
    assert other.state().timer == (saved.timer + PM_TIMER_HZ // 1000) & 0xFFFFFF


@pytest.mark.parametrize("bad", [
    AcpiPmState(pm1_status=0x10000), AcpiPmState(pm1_status=0x0002), AcpiPmState(pm1_enable=0x8000),
    AcpiPmState(pm1_control=SLP_EN), AcpiPmState(timer=1 << 24), AcpiPmState(timer=-1),
    AcpiPmState(pm1_control="1"), AcpiPmState(pm1_enable=True)])
def test_restore_rejects_invalid_state(pm, bad):
    before = pm.state()
    with pytest.raises(StateError):
        pm.restore(bad)
    with pytest.raises(StateError):
        pm.restore("not a state")  # type: ignore[arg-type]
    assert pm.state() == before


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-2, PM_BLOCK_LENGTH + 2), st.sampled_from([0, 1, 2, 3, 4, 8]),
                          st.integers(0, (1 << 64) - 1), st.booleans()), max_size=30))
def test_hostile_access_sequences_never_raise_and_keep_state_valid(ops):
    seen = []
    pm = AcpiPm(on_poweroff=lambda: seen.append("off"), on_reset=lambda: seen.append("reset"))
    for offset, size, value, is_write in ops:
        if is_write:
            pm.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        else:
            assert len(pm.read(offset, size)) == size
    pm.state().validate()
    AcpiPm(on_poweroff=lambda: None, on_reset=lambda: None).restore(pm.state())


class _Line:
    def __init__(self) -> None:
        self.level = False

    def set_level(self, high: bool) -> None:
        self.level = bool(high)


def test_power_button_raises_the_sci_only_while_enabled_and_pending():
    from kvmpy.devices.acpi_pm import PM1_EN_OFFSET, PM1_STS_OFFSET, PWRBTN_STS, AcpiPm
    sci = _Line()
    pm = AcpiPm(on_poweroff=lambda: None, on_reset=lambda: None, sci=sci)
    pm.press_power_button()
    assert int.from_bytes(pm.read(PM1_STS_OFFSET, 2), "little") & PWRBTN_STS
    assert not sci.level                                     # the guest has not enabled it
    pm.write(PM1_EN_OFFSET, PWRBTN_STS.to_bytes(2, "little"))
    assert sci.level                                         # enabled and pending: SCI up
    pm.write(PM1_STS_OFFSET, PWRBTN_STS.to_bytes(2, "little"))   # write 1 to clear
    assert not sci.level and not int.from_bytes(pm.read(PM1_STS_OFFSET, 2), "little") & PWRBTN_STS
    pm.press_power_button()
    assert sci.level
    fresh_sci = _Line()
    other = AcpiPm(on_poweroff=lambda: None, on_reset=lambda: None, sci=fresh_sci)
    other.restore(pm.state())                                # a restored pending press keeps the SCI up
    assert fresh_sci.level
