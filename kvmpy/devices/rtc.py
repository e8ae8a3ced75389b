"""MC146818 CMOS RTC at ports 0x70 (index) / 0x71 (data), with the 128 bytes of CMOS RAM.

Time is the injected `clock()` (Unix seconds, default `time.time`) plus an offset the guest
changes by writing the time registers, reported in UTC as PCs and Linux expect by default.
Register B selects BCD or binary (bit 2) and 24 or 12 hour (bit 1) encoding; SET (bit 7)
freezes the time registers so the guest can write them and commit on clearing SET.
Register A's UIP bit is high during the last 244 us of each second, so Linux's "wait while
UIP" loops terminate. Bit 7 of the index write (NMI disable) is stored and otherwise ignored.

Interrupts (IRQ 8): update-ended, alarm (with "don't care" values 0xC0-0xFF) and periodic
flags are computed lazily from the clock whenever the guest reads register C, or when the
composer calls `poll()`. The line is level: high while C.IRQF is set, lowered by reading C.
A guest that enables RTC interrupts needs the composer to call `poll()` on a timer (e.g. every
`poll_interval()` seconds); the device itself starts no threads. An alarm is only noticed if
its second is current when checked (no catch-up for seconds skipped between polls).
"""
from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, ClassVar

from kvmpy.devices.irq import IrqLine, NullIrqLine
from kvmpy.errors import StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import check_bytes, check_int, expect_state, versioned

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

RTC_PORT = 0x70
RTC_IRQ = 8
CMOS_SIZE = 128

SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = range(6)
WEEKDAY, DAY, MONTH, YEAR = 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
CENTURY = 0x32
TIME_REGISTERS = (SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY)

A_UIP = 0x80
A_DIVIDER_NORMAL = 0x20    # 32.768 kHz time base, oscillator running
A_DEFAULT = A_DIVIDER_NORMAL | 0x06   # 1024 Hz periodic rate
B_SET, B_PIE, B_AIE, B_UIE = 0x80, 0x40, 0x20, 0x10
B_BINARY, B_24H = 0x04, 0x02
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80
UIP_WINDOW_S = 244e-6
ALARM_DONT_CARE = 0xC0

# CMOS RAM layout used by firmware and Linux to size memory.
CMOS_BASE_MEM_KB = 0x15          # 16-bit, KiB below 640K
CMOS_EXT_MEM_KB = 0x17           # 16-bit, KiB above 1 MiB (capped at 0xFFFF)
CMOS_EXT_MEM_KB_COPY = 0x30      # same value, second copy
CMOS_MEM_ABOVE_16M = 0x34        # 16-bit, 64 KiB units between 16 MiB and 4 GiB
CMOS_MEM_ABOVE_4G = 0x5B         # 24-bit, 64 KiB units above 4 GiB
CMOS_CHECKSUM = 0x2E             # 16-bit big-endian sum of 0x10..0x2D
MiB = 1 << 20
MAX_OFFSET_S = 1500 * 366 * 86400   # keeps guest time inside datetime's years 1..9999
MAX_PERIOD_US = 500_000             # the slowest periodic rate (2 Hz)
MAX_GUEST_SECOND = 1 << 40          # far beyond year 9999 in either direction


def _default_cmos() -> bytes:
    ram = bytearray(CMOS_SIZE)
    ram[REG_A], ram[REG_B], ram[REG_D] = A_DEFAULT, B_24H, D_VRT
    return bytes(ram)


@versioned("rtc-mc146818", 1)
@dataclass
class RtcState:
    """CMOS RAM and the clock, in integers only so the state means the same on another host and
    in another process: the guest's offset from the host clock is whole seconds (the guest can
    only set whole seconds) and the next periodic flag is kept relative to the moment the state
    was taken, not as a host-clock time."""
    cmos: bytes = field(default_factory=_default_cmos)
    index: int = 0
    nmi_disabled: bool = False
    offset_s: int = 0               # guest RTC time minus host clock, whole seconds
    last_second: int = 0            # guest second at the last flag update
    periodic_remaining_us: int = 0  # time until the next periodic flag (0: due now)

    def validate(self) -> None:
        what = "RTC state"
        cmos = check_bytes(what, "cmos", self.cmos, size=CMOS_SIZE)
        check_int(what, "index", self.index, hi=CMOS_SIZE - 1)
        if not isinstance(self.nmi_disabled, bool):
            raise StateError(f"restoring {what}", detail="nmi_disabled is not a bool")
        check_int(what, "offset_s", self.offset_s, lo=-MAX_OFFSET_S, hi=MAX_OFFSET_S)
        check_int(what, "last_second", self.last_second, lo=-MAX_GUEST_SECOND, hi=MAX_GUEST_SECOND)
        check_int(what, "periodic_remaining_us", self.periodic_remaining_us, hi=MAX_PERIOD_US)
        if cmos[REG_C] & 0x0F or cmos[REG_A] & A_UIP:
            raise StateError(f"restoring {what}", detail="reserved bits set in A/C")


class CmosRtc:
    """Register at `RTC_PORT` with length 2 (offset 0 = index, offset 1 = data)."""

    DEVICE_KIND: ClassVar[str] = "mc146818rtc"

    def __init__(self, irq: IrqLine | None = None, clock: Callable[[], float] = time.time):
        self.irq = irq or NullIrqLine()
        self.clock = clock
        self._lock = threading.Lock()
        self._irq_level = False
        self._load(RtcState(last_second=int(clock())))

    def __repr__(self) -> str:
        return "CmosRtc()"

    # -- composer helpers --------------------------------------------------------------------

    def set_memory_size(self, below_4g: int, above_4g: int) -> None:
        """Fill the CMOS memory-size bytes (as PC firmware does) for guests that read them."""
        if below_4g < 0 or above_4g < 0 or below_4g > 4 << 30:
            raise ValueError("memory sizes must be >= 0 and below_4g <= 4 GiB")
        with self._lock:
            ram = self._cmos
            self._put16(CMOS_BASE_MEM_KB, 640)
            ext_kb = min(max(below_4g // 1024 - 1024, 0), 0xFFFF)
            self._put16(CMOS_EXT_MEM_KB, ext_kb)
            self._put16(CMOS_EXT_MEM_KB_COPY, ext_kb)
            self._put16(CMOS_MEM_ABOVE_16M, min(max(below_4g - 16 * MiB, 0) >> 16, 0xFFFF))
            high = min(above_4g >> 16, 0xFFFFFF)
            ram[CMOS_MEM_ABOVE_4G:CMOS_MEM_ABOVE_4G + 3] = high.to_bytes(3, "little")
            total = sum(ram[0x10:0x2E])
            ram[CMOS_CHECKSUM], ram[CMOS_CHECKSUM + 1] = (total >> 8) & 0xFF, total & 0xFF

    def _put16(self, reg: int, value: int) -> None:
        self._cmos[reg:reg + 2] = value.to_bytes(2, "little")

    def poll(self) -> None:
        """Update the interrupt flags from the clock and drive IRQ 8 (call on a timer)."""
        with self._lock:
            self._update_flags(self.clock())
            self._update_irq()

    def poll_interval(self) -> float | None:
        """How often `poll()` is worth calling for the interrupts the guest enabled."""
        with self._lock:
            b = self._cmos[REG_B]
            if b & B_PIE and self._period_s():
                return self._period_s()
            return 1.0 if b & (B_AIE | B_UIE) else None

    # -- guest side --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            value = self._read_data() if offset == 1 else 0xFF   # the index port is write-only
        return bytes((value,)) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if offset == 0:
                self._index = data[0] & 0x7F
                self._nmi_disabled = bool(data[0] & 0x80)
            elif offset == 1:
                self._write_data(data[0])

    def _read_data(self) -> int:
        reg, now = self._index, self.clock()
        if reg in TIME_REGISTERS and not self._cmos[REG_B] & B_SET:
            return self._encoded_time(now)[reg]
        if reg == REG_A:
            frac = (now + self._offset) % 1.0
            uip = A_UIP if frac >= 1.0 - UIP_WINDOW_S and not self._cmos[REG_B] & B_SET else 0
            return self._cmos[REG_A] | uip
        if reg == REG_C:
            self._update_flags(now)
            value = self._cmos[REG_C]
            self._cmos[REG_C] = 0
            self._update_irq()
            return value
        if reg == REG_D:
            return D_VRT
        return self._cmos[reg]

    def _write_data(self, value: int) -> None:
        reg, now = self._index, self.clock()
        if reg in TIME_REGISTERS:
            frozen = bool(self._cmos[REG_B] & B_SET)
            if not frozen:
                self._latch(now)
            self._cmos[reg] = value
            if not frozen:
                self._commit(now)
        elif reg == REG_A:
            self._cmos[REG_A] = value & ~A_UIP
            self._periodic_due = now + (self._period_s() or 0.0)
        elif reg == REG_B:
            old = self._cmos[REG_B]
            if value & B_SET:
                value &= ~B_UIE        # setting SET clears UIE, per the MC146818 datasheet
                if not old & B_SET:
                    self._latch(now)
            self._cmos[REG_B] = value
            if old & B_SET and not value & B_SET:
                self._commit(now)
            self._recompute_irqf()
        elif reg in (REG_C, REG_D):
            _guest_log.debug(("rtc", "ro"), "rtc: write %#x to read-only register %#x",
                             value, reg)
        else:
            self._cmos[reg] = value

    # -- time encoding -----------------------------------------------------------------------

    def _guest_datetime(self, now: float) -> datetime:
        return datetime.fromtimestamp(math.floor(now + self._offset), tz=timezone.utc)

    def _encoded_time(self, now: float) -> dict[int, int]:
        dt = self._guest_datetime(now)
        b = self._cmos[REG_B]
        hour = dt.hour
        if b & B_24H:
            hour_byte = self._encode(hour)
        else:
            hour_byte = self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        return {SECONDS: self._encode(dt.second), MINUTES: self._encode(dt.minute),
                HOURS: hour_byte, WEEKDAY: self._encode(dt.isoweekday() % 7 + 1),
                DAY: self._encode(dt.day), MONTH: self._encode(dt.month),
                YEAR: self._encode(dt.year % 100), CENTURY: self._encode(dt.year // 100)}

    def _encode(self, value: int) -> int:
        return value if self._cmos[REG_B] & B_BINARY else ((value // 10) << 4) | (value % 10)

    def _decode(self, byte: int) -> int:
        if self._cmos[REG_B] & B_BINARY:
            return byte
        if byte & 0x0F > 9 or byte >> 4 > 9:
            raise ValueError(f"{byte:#x} is not BCD")
        return (byte >> 4) * 10 + (byte & 0x0F)

    def _latch(self, now: float) -> None:
        for reg, value in self._encoded_time(now).items():
            self._cmos[reg] = value

    def _commit(self, now: float) -> None:
        """The guest set the clock: derive a new offset from the time registers."""
        ram = self._cmos
        try:
            hour_byte = ram[HOURS]
            if ram[REG_B] & B_24H:
                hour = self._decode(hour_byte)
            else:
                hour = self._decode(hour_byte & 0x7F) % 12 + (12 if hour_byte & 0x80 else 0)
            dt = datetime(self._decode(ram[CENTURY]) * 100 + self._decode(ram[YEAR]),
                          self._decode(ram[MONTH]), self._decode(ram[DAY]), hour,
                          self._decode(ram[MINUTES]), self._decode(ram[SECONDS]),
                          tzinfo=timezone.utc)
        except ValueError as e:
            _guest_log.warning(("rtc", "bad-time"), "rtc: guest wrote an invalid time (%s); "
                               "keeping the old one", e)
            return
        offset = round(dt.timestamp()) - math.floor(now)   # keep the host's sub-second phase
        if abs(offset) > MAX_OFFSET_S:
            _guest_log.warning(("rtc", "far-time"), "rtc: guest set the clock to %s, too far "
                               "from the host's; keeping the old time", dt.isoformat())
            return
        self._offset = offset
        self._last_second = math.floor(now + self._offset)

    # -- interrupts --------------------------------------------------------------------------

    def _period_s(self) -> float:
        a = self._cmos[REG_A]
        rate = a & 0x0F
        if rate == 0 or a & 0x70 != A_DIVIDER_NORMAL:
            return 0.0
        if rate < 3:
            rate += 7    # rates 1 and 2 alias to 256 Hz and 128 Hz on a 32.768 kHz base
        return (1 << (rate - 1)) / 32768.0

    def _update_flags(self, now: float) -> None:
        ram = self._cmos
        if not ram[REG_B] & B_SET:
            second = math.floor(now + self._offset)
            if second != self._last_second:
                self._last_second = second
                ram[REG_C] |= C_UF
                enc = self._encoded_time(now)
                if all(ram[alarm] >= ALARM_DONT_CARE or ram[alarm] == enc[reg]
                       for alarm, reg in ((SECONDS_ALARM, SECONDS), (MINUTES_ALARM, MINUTES),
                                          (HOURS_ALARM, HOURS))):
                    ram[REG_C] |= C_AF
        period = self._period_s()
        if period and now >= self._periodic_due:
            ram[REG_C] |= C_PF
            self._periodic_due = now + period - (now - self._periodic_due) % period
        self._recompute_irqf()

    def _recompute_irqf(self) -> None:
        ram = self._cmos
        c, b = ram[REG_C], ram[REG_B]
        if (c & C_PF and b & B_PIE) or (c & C_AF and b & B_AIE) or (c & C_UF and b & B_UIE):
            ram[REG_C] = c | C_IRQF
        self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self._cmos[REG_C] & C_IRQF)
        if level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)

    # -- state -------------------------------------------------------------------------------

    def state(self) -> RtcState:
        with self._lock:
            remaining = self._periodic_due - self.clock()
            remaining_us = min(max(round(remaining * 1e6), 0), MAX_PERIOD_US)
            return RtcState(cmos=bytes(self._cmos), index=self._index,
                            nmi_disabled=self._nmi_disabled, offset_s=self._offset,
                            last_second=self._last_second, periodic_remaining_us=remaining_us)

    def check_state(self, state: object) -> RtcState:
        """Validate `state` without touching the RTC."""
        checked = expect_state(state, RtcState, "RTC state")
        checked.validate()
        return checked

    def restore(self, state: RtcState) -> None:
        state = self.check_state(state)
        with self._lock:
            self._load(state)

    def _load(self, state: RtcState) -> None:
        self._cmos = bytearray(state.cmos)
        self._index, self._nmi_disabled = state.index, state.nmi_disabled
        self._offset, self._last_second = state.offset_s, state.last_second
        self._periodic_due = self.clock() + state.periodic_remaining_us / 1e6
        self._irq_level = bool(self._cmos[REG_C] & C_IRQF)
        self.irq.set_level(self._irq_level)
