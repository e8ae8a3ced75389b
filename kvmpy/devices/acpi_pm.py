"""ACPI power-management registers (PM1a event/control, PM timer, reset) as one port-bus block,
so a guest's ACPI `poweroff` and reset reach kvmpy instead of halting forever.

Block layout (offsets from the registered base; the composer puts the same ports in the FADT):
  +0  PM1a_STS (16 bits, write 1 to clear)   +2  PM1a_EN (16 bits)
  +4  PM1a_CNT (16 bits: SCI_EN, SLP_TYP, SLP_EN)
  +8  PM_TMR  (24-bit 3.579545 MHz counter, read-only)
  +12 RESET   (8 bits: RESET_VALUE resets the machine)
A write that sets SLP_EN with SLP_TYP = the `\\_S5` value calls `on_poweroff()`; other sleep
types are refused (kvmpy offers no S1-S4). The one event source is the fixed-feature power
button (`press_power_button()`, QMP system_powerdown): it sets PWRBTN_STS and, while the guest
has enabled it, raises the SCI (a level IRQ line) until the guest clears the status bit.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, ClassVar

from kvmpy.devices.irq import IrqLine
from kvmpy.errors import StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import check_int, expect_state, versioned

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

PM_BASE_PORT = 0x600                  # where PIIX4/ICH9 firmware usually puts the PM block
PM_BLOCK_LENGTH = 0x10
PM1_STS_OFFSET, PM1_EN_OFFSET, PM1_CNT_OFFSET, PM_TMR_OFFSET, RESET_OFFSET = 0x0, 0x2, 0x4, 0x8, 0xC
RESET_VALUE = 0x06                    # what 0xCF9-style reset registers take: full reset
S5_SLEEP_TYPE = 5

PM_TIMER_HZ = 3_579_545
PM_TIMER_MASK = 0xFF_FFFF             # 24-bit counter (the FADT leaves TMR_VAL_EXT clear)
PM1_STS_MASK = 0x8731                 # TMR, BM, GBL, PWRBTN, SLPBTN, RTC, WAK status bits
PM1_EN_MASK = 0x0721                  # TMR, GBL, PWRBTN, SLPBTN, RTC enables
SCI_EN = 1 << 0
BM_RLD = 1 << 1
GBL_RLS = 1 << 2                      # write-only: reads as 0
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7 << 10
SLP_EN = 1 << 13                      # write-only: reads as 0
PM1_CNT_STORED = SCI_EN | BM_RLD | SLP_TYP_MASK
PWRBTN_STS = PWRBTN_EN = 1 << 8

# (offset, width) of each register; accesses may cover parts of several.
_REGISTERS = ((PM1_STS_OFFSET, 2), (PM1_EN_OFFSET, 2), (PM1_CNT_OFFSET, 2), (PM_TMR_OFFSET, 4),
              (RESET_OFFSET, 1))


@versioned("acpi-pm", 1)
@dataclass
class AcpiPmState:
    """The PM1 registers and the PM timer's count (the timer runs on from that count)."""
    pm1_status: int = 0
    pm1_enable: int = 0
    pm1_control: int = SCI_EN         # no SMI_CMD in the FADT: the machine is always in ACPI mode
    timer: int = 0                    # the PM timer's count when the state was taken

    def validate(self) -> None:
        for name, value, mask in (("pm1_status", self.pm1_status, PM1_STS_MASK),
                                  ("pm1_enable", self.pm1_enable, PM1_EN_MASK),
                                  ("pm1_control", self.pm1_control, PM1_CNT_STORED),
                                  ("timer", self.timer, PM_TIMER_MASK)):
            if check_int("ACPI PM state", name, value, bits=32) & ~mask:
                raise StateError("restoring ACPI PM state", detail=f"{name}={value:#x} has reserved bits")


class AcpiPm:
    """The PM register block. `on_poweroff`/`on_reset` run on the vCPU thread that wrote."""

    DEVICE_KIND: ClassVar[str] = "acpi-pm"

    def __init__(self, on_poweroff: Callable[[], None], on_reset: Callable[[], None], *,
                 s5_sleep_type: int = S5_SLEEP_TYPE, reset_value: int = RESET_VALUE,
                 clock_ns: Callable[[], int] = time.monotonic_ns, sci: "IrqLine | None" = None):
        self.on_poweroff = on_poweroff
        self.sci = sci
        self.on_reset = on_reset
        self.s5_sleep_type = s5_sleep_type
        self.reset_value = reset_value
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._status = 0
        self._enable = 0
        self._control = SCI_EN
        self._timer_epoch_ns = clock_ns()
        self._timer_offset = 0

    def __repr__(self) -> str:
        return "AcpiPm()"

    # -- registers -----------------------------------------------------------------------------
    def timer_count(self) -> int:
        ticks = (self._clock_ns() - self._timer_epoch_ns) * PM_TIMER_HZ // 1_000_000_000
        return (self._timer_offset + ticks) & PM_TIMER_MASK

    def _register_value(self, offset: int) -> int:
        if offset == PM1_STS_OFFSET:
            return self._status
        if offset == PM1_EN_OFFSET:
            return self._enable
        if offset == PM1_CNT_OFFSET:
            return self._control
        if offset == PM_TMR_OFFSET:
            return self.timer_count()
        return 0                                   # RESET reads as 0

    def read(self, offset: int, size: int) -> bytes:
        if not self._access_ok(offset, size, "read"):
            return b"\xff" * max(size, 0)
        out = bytearray(size)
        with self._lock:
            for reg, width in _REGISTERS:
                lo, hi = max(offset, reg), min(offset + size, reg + width)
                if lo < hi:
                    value = self._register_value(reg).to_bytes(width, "little")
                    out[lo - offset:hi - offset] = value[lo - reg:hi - reg]
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        if not self._access_ok(offset, len(data), "write"):
            return
        action: Callable[[], None] | None = None
        with self._lock:
            for reg, width in _REGISTERS:
                lo, hi = max(offset, reg), min(offset + len(data), reg + width)
                if lo >= hi:
                    continue
                shift = 8 * (lo - reg)
                mask = ((1 << (8 * (hi - lo))) - 1) << shift
                value = int.from_bytes(data[lo - offset:hi - offset], "little") << shift
                action = self._write_register(reg, value, mask) or action
            self._update_sci()
        if action is not None:
            action()

    def press_power_button(self) -> None:
        """The ACPI fixed power button: the guest's OS decides what to do (usually shut down)."""
        with self._lock:
            self._status |= PWRBTN_STS
            self._update_sci()

    def _update_sci(self) -> None:
        """SCI level = an enabled event is pending and SCI_EN is set (under the lock)."""
        if self.sci is not None:
            self.sci.set_level(bool(self._status & self._enable & PWRBTN_EN) and bool(self._control & SCI_EN))

    def _write_register(self, reg: int, value: int, mask: int) -> Callable[[], None] | None:
        """Apply one (partial) register write under the lock; returns what to call after it."""
        if reg == PM1_STS_OFFSET:
            self._status &= ~(value & mask)
        elif reg == PM1_EN_OFFSET:
            self._enable = (self._enable & ~mask) | (value & mask & PM1_EN_MASK)
        elif reg == PM1_CNT_OFFSET:
            self._control = (self._control & ~mask) | (value & mask & PM1_CNT_STORED)
            if value & mask & SLP_EN:
                return self._sleep((self._control & SLP_TYP_MASK) >> SLP_TYP_SHIFT)
        elif reg == RESET_OFFSET:
            if (value & mask & 0xFF) == self.reset_value:
                log.info("guest wrote the ACPI reset register")
                return self.on_reset
            _guest_log.debug(("acpi-pm", "reset"), "ACPI reset register: ignored value %#x", value & 0xFF)
        return None                                 # PM_TMR is read-only

    def _sleep(self, sleep_type: int) -> Callable[[], None] | None:
        if sleep_type == self.s5_sleep_type:
            log.info("guest entered ACPI S5 (soft off)")
            return self.on_poweroff
        _guest_log.warning(("acpi-pm", "sleep"), "guest asked for ACPI sleep type %d; only S5 (%d) "
                           "is offered, ignored", sleep_type, self.s5_sleep_type)
        return None

    @staticmethod
    def _access_ok(offset: int, size: int, what: str) -> bool:
        if size in (1, 2, 4) and 0 <= offset and offset + size <= PM_BLOCK_LENGTH:
            return True
        _guest_log.debug(("acpi-pm", what), "ACPI PM: ignored %d-byte %s at +%d", size, what, offset)
        return False

    # -- state -----------------------------------------------------------------------------------
    def state(self) -> AcpiPmState:
        with self._lock:
            return AcpiPmState(self._status, self._enable, self._control, self.timer_count())

    def check_state(self, state: object) -> AcpiPmState:
        """Validate `state` without touching the registers."""
        checked = expect_state(state, AcpiPmState, "ACPI PM state")
        checked.validate()
        return checked

    def restore(self, state: AcpiPmState) -> None:
        state = self.check_state(state)
        with self._lock:
            self._status, self._enable, self._control = state.pm1_status, state.pm1_enable, state.pm1_control
            self._timer_epoch_ns = self._clock_ns()
            self._timer_offset = state.timer
            self._update_sci()
