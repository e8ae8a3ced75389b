"""Tiny legacy PC ports Linux touches: POST/io-delay (0x80), fast A20 + reset (0x92), system
control port B (0x61), and quiet sinks for ISA devices that are probed but absent.

Port 0x61 recommendation: create the in-kernel PIT with KVM_CREATE_PIT2 flags =
KVM_PIT_SPEAKER_DUMMY. KVM then handles 0x61 itself, with OUT2 (bit 5) following the real
channel-2 counter, so Linux's PIT-based TSC calibration works and no exit reaches Python. (KVM claims 0x61-0x64
for it but answers only 0x61; accesses to 0x64 still exit to the i8042.)
`SystemControlPortB` is the fallback when that flag is not used: it cannot see the in-kernel
PIT, so it makes OUT2 rise a fixed number of reads after the gate (bit 0) goes high, like a
mode-0 one-shot. Calibration loops then terminate; Linux rejects the result and uses another
clock source (kvm-clock / CPUID TSC frequency). Bit 4 (refresh) toggles on every read.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass, fields
from typing import Callable, ClassVar, TypeVar

from kvmpy.errors import StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import expect_state, versioned

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

POST_CODE_PORT = 0x80
IO_DELAY_ALT_PORT = 0xED      # Linux's io_delay=0xed alternative; a PostCodePort works there
FAST_A20_PORT = 0x92
SYSTEM_CONTROL_B_PORT = 0x61

# Legacy ISA ranges Linux (or its drivers) may probe and kvmpy does not implement. Reads float
# high (0xff: "nothing here"), writes vanish. (base, length, what would live there)
LEGACY_PROBE_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x000, 0x10, "DMA controller 1"),
    (0x081, 0x0F, "DMA page registers"),
    (0x0C0, 0x20, "DMA controller 2"),
    (0x0F0, 0x10, "FPU error"),
    (0x170, 0x08, "secondary IDE"),
    (0x1F0, 0x08, "primary IDE"),
    (0x278, 0x03, "LPT2"),
    (0x2E8, 0x08, "COM4"),
    (0x2F8, 0x08, "COM2"),
    (0x378, 0x03, "LPT1"),
    (0x3B0, 0x30, "VGA"),
    (0x3E8, 0x08, "COM3"),
    (0x3F0, 0x08, "floppy"),
)


S = TypeVar("S")
COUNTER_LIMIT = (1 << 63) - 1


def _checked(state: object, cls: type[S], what: str, limits: dict[str, int]) -> S:
    """The state as `cls`, every int field within [0, limits[name]] and every other a bool."""
    checked = expect_state(state, cls, what)
    for name in _field_names(cls):
        value = getattr(checked, name)
        if name in limits:
            if type(value) is not int or not 0 <= value <= limits[name]:
                raise StateError(f"restoring {what}", detail=f"{name}={value!r}")
        elif not isinstance(value, bool):
            raise StateError(f"restoring {what}", detail=f"{name} is not a bool")
    return checked


@functools.cache
def _field_names(cls: type) -> tuple[str, ...]:
    """A state class's fields, once: a restore checks a dozen small devices at the switchover."""
    return tuple(f.name for f in fields(cls))


@versioned("port80", 1)
@dataclass
class PostCodeState:
    last_code: int = 0
    writes: int = 0


class PostCodePort:
    """Port 0x80: firmware POST codes and Linux's I/O delay. Swallows writes, remembers the
    last value. This is on a hot path (one exit per outb_p), so it does almost nothing."""

    DEVICE_KIND: ClassVar[str] = "port80"

    def __init__(self) -> None:
        self.last_code = 0
        self.writes = 0

    def __repr__(self) -> str:
        return "PostCodePort()"

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.last_code = data[0]   # a single store: atomic under the GIL, no lock needed
            self.writes += 1

    def state(self) -> PostCodeState:
        return PostCodeState(self.last_code, self.writes)

    def check_state(self, state: object) -> PostCodeState:
        return _checked(state, PostCodeState, "port 0x80 state",
                        {"last_code": 0xFF, "writes": COUNTER_LIMIT})

    def restore(self, state: PostCodeState) -> None:
        state = self.check_state(state)
        self.last_code, self.writes = state.last_code, state.writes


A20_ENABLE = 0x02
FAST_RESET = 0x01


@versioned("port92", 1)
@dataclass
class FastA20State:
    value: int = A20_ENABLE


class FastA20Port:
    """Port 0x92 (PS/2 system control port A): bit 1 gates A20 (recorded only: KVM does not
    emulate A20 masking), a 0 -> 1 transition of bit 0 resets the machine via `on_reset`."""

    DEVICE_KIND: ClassVar[str] = "port92"

    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self._lock = threading.Lock()
        self._value = A20_ENABLE

    def __repr__(self) -> str:
        return "FastA20Port()"

    @property
    def a20_enabled(self) -> bool:
        return bool(self._value & A20_ENABLE)

    def read(self, offset: int, size: int) -> bytes:
        return bytes((self._value,)) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            old, self._value = self._value, data[0] & (A20_ENABLE | FAST_RESET)
            reset = bool(self._value & FAST_RESET and not old & FAST_RESET)
        if reset:
            log.info("guest requested reset through port 0x92")
            self.on_reset()

    def state(self) -> FastA20State:
        return FastA20State(self._value)

    def check_state(self, state: object) -> FastA20State:
        checked = _checked(state, FastA20State, "port 0x92 state", {"value": 0xFF})
        if checked.value & ~(A20_ENABLE | FAST_RESET):
            raise StateError("restoring port 0x92 state", detail=f"value={checked.value:#x}")
        return checked

    def restore(self, state: FastA20State) -> None:
        state = self.check_state(state)
        with self._lock:
            self._value = state.value


GATE2 = 0x01
SPEAKER_DATA = 0x02
PORTB_WRITABLE = 0x0F        # gate, speaker, parity/channel check enables
REFRESH_TOGGLE = 0x10
OUT2 = 0x20
OUT2_DELAY_READS = 64


@versioned("port61", 1)
@dataclass
class SystemControlBState:
    value: int = 0
    refresh: bool = False
    reads_since_gate: int = 0


class SystemControlPortB:
    """Port 0x61 fallback (see the module docstring for when to use it instead of KVM's)."""

    DEVICE_KIND: ClassVar[str] = "port61"

    def __init__(self, out2_delay_reads: int = OUT2_DELAY_READS):
        self.out2_delay_reads = out2_delay_reads
        self._lock = threading.Lock()
        self._value = 0
        self._refresh = False
        self._reads_since_gate = 0

    def __repr__(self) -> str:
        return "SystemControlPortB()"

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            self._refresh = not self._refresh
            value = self._value | (REFRESH_TOGGLE if self._refresh else 0)
            if self._value & GATE2:
                if self._reads_since_gate >= self.out2_delay_reads:
                    value |= OUT2
                else:
                    self._reads_since_gate += 1
        return bytes((value,)) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            new = data[0] & PORTB_WRITABLE
            if new & GATE2 and not self._value & GATE2:
                self._reads_since_gate = 0     # gate rising edge restarts the count
            self._value = new

    def state(self) -> SystemControlBState:
        with self._lock:
            return SystemControlBState(self._value, self._refresh, self._reads_since_gate)

    def check_state(self, state: object) -> SystemControlBState:
        checked = _checked(state, SystemControlBState, "port 0x61 state",
                           {"value": 0xFF, "reads_since_gate": self.out2_delay_reads})
        if checked.value & ~PORTB_WRITABLE:
            raise StateError("restoring port 0x61 state", detail=f"value={checked.value:#x}")
        return checked

    def restore(self, state: SystemControlBState) -> None:
        state = self.check_state(state)
        with self._lock:
            self._value, self._refresh = state.value, state.refresh
            self._reads_since_gate = state.reads_since_gate


@versioned("probe-sink", 1)
@dataclass
class ProbeSinkState:
    reads: int = 0
    writes: int = 0


class ProbeSink:
    """An absent ISA device: reads return all-ones, writes are dropped, both are counted and
    logged at debug level (rate-limited), so probes of absent hardware are quiet and cheap."""

    DEVICE_KIND: ClassVar[str] = "probe-sink"

    def __init__(self, name: str):
        self.name = name
        self.reads = 0
        self.writes = 0

    def __repr__(self) -> str:
        return f"ProbeSink({self.name})"

    def read(self, offset: int, size: int) -> bytes:
        self.reads += 1
        _guest_log.debug(("probe", self.name), "guest probed absent %s (read +%#x)",
                         self.name, offset)
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes += 1
        _guest_log.debug(("probe", self.name), "guest probed absent %s (write +%#x)",
                         self.name, offset)

    def state(self) -> ProbeSinkState:
        return ProbeSinkState(self.reads, self.writes)

    def check_state(self, state: object) -> ProbeSinkState:
        return _checked(state, ProbeSinkState, f"{self.name} state",
                        {"reads": COUNTER_LIMIT, "writes": COUNTER_LIMIT})

    def restore(self, state: ProbeSinkState) -> None:
        state = self.check_state(state)
        self.reads, self.writes = state.reads, state.writes


def probe_sinks() -> list[tuple[int, int, ProbeSink]]:
    """(base, length, device) for every range in LEGACY_PROBE_RANGES, for the composer."""
    return [(base, length, ProbeSink(name)) for base, length, name in LEGACY_PROBE_RANGES]
