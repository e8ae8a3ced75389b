"""Debug-exit port, compatible with QEMU's isa-debug-exit, so test guests can end kvmpy with a
status of their choosing.

A write of value v (1 to 4 bytes, little-endian, at offset 0) calls `on_exit(code)` with
code = (v << 1) | 1, QEMU's convention: the result is always odd, so a guest can never fake a
clean exit 0, and "v = 0" means success-by-convention (status 1). The code is passed whole; a
process exit status keeps only its low 8 bits (the CLI's business). Default port 0x501.

`--device isa-debug-exit,iobase=PORT,iosize=N` places it as QEMU's users spell it (QEMU's
defaults: iobase 0x501, iosize 2); such a device, like QEMU's, takes a write of 1 to 4 bytes at
any offset in its window (kernels written for QEMU write to iobase+1 or use a 16-bit out).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar

from kvmpy.errors import ConfigError, StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import expect_state, versioned

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

DEBUG_EXIT_PORT = 0x501
DEBUG_EXIT_WIDTH = 4     # register length: a 32-bit write at the base is accepted
QEMU_DEFAULT_IOSIZE = 2  # QEMU's isa-debug-exit iosize property default


@dataclass(frozen=True)
class DebugExitSpec:
    """One `--device isa-debug-exit[,iobase=PORT][,iosize=N]` (QEMU's property names and defaults)."""
    iobase: int = DEBUG_EXIT_PORT
    iosize: int = QEMU_DEFAULT_IOSIZE


def _qemu_int(name: str, text: str) -> int:
    """QEMU's integer property syntax: decimal, 0x hex, or a leading-0 octal."""
    try:
        if len(text) > 1 and text.startswith("0") and text.isdigit():
            return int(text, 8)
        return int(text, 0)
    except ValueError:
        raise ConfigError("parsing --device isa-debug-exit", detail=f"{name}={text!r} is not a number") from None


def parse_debug_exit_spec(options: list[str]) -> DebugExitSpec:
    """isa-debug-exit's options (after the driver name), already split at single commas."""
    values: dict[str, int] = {}
    for part in options:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if key not in ("iobase", "iosize") or not sep:
            raise ConfigError("parsing --device isa-debug-exit",
                              detail=f"{part!r}: the properties are iobase=PORT and iosize=N")
        values[key] = _qemu_int(key, value)
    spec = DebugExitSpec(**values)
    if not 1 <= spec.iosize <= 0x100 or not 0 <= spec.iobase or spec.iobase + spec.iosize > 0x10000:
        raise ConfigError("parsing --device isa-debug-exit",
                          detail=f"iobase={spec.iobase:#x},iosize={spec.iosize:#x} is not a window in the "
                                 "16-bit port space (iosize 1..0x100)")
    return spec


def exit_code_for(value: int) -> int:
    """The code a guest write of `value` produces (QEMU's (v << 1) | 1)."""
    return (value << 1) | 1


@versioned("debug-exit", 1)
@dataclass
class DebugExitState:
    """The last exit code the guest asked for (None: it never wrote the port)."""
    last_code: int | None = None

    def validate(self) -> None:
        if self.last_code is not None and (type(self.last_code) is not int
                                           or self.last_code < 1 or not self.last_code & 1
                                           or self.last_code >= 1 << 33):
            raise StateError("restoring debug-exit state", detail=f"last_code={self.last_code!r}")


class DebugExit:
    """The port; `on_exit(code)` runs on the vCPU thread that wrote it."""

    DEVICE_KIND: ClassVar[str] = "isa-debug-exit"

    def __init__(self, on_exit: Callable[[int], None], window: int | None = None):
        """`window`: QEMU's semantics, a write at any offset below it exits; None: kvmpy's
        default port, where only a write at offset 0 does."""
        self.on_exit = on_exit
        self.window = window
        self._lock = threading.Lock()
        self.last_code: int | None = None

    def __repr__(self) -> str:
        return "DebugExit()"

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        last = 1 if self.window is None else self.window
        if not 0 <= offset < last or not 1 <= len(data) <= 4:
            _guest_log.debug(("debug-exit", "bad"), "debug-exit: ignored %d-byte write at +%d",
                             len(data), offset)
            return
        code = exit_code_for(int.from_bytes(data, "little"))
        with self._lock:
            self.last_code = code
        log.info("guest wrote the debug-exit port: exit code %d", code)
        self.on_exit(code)

    def state(self) -> DebugExitState:
        with self._lock:
            return DebugExitState(self.last_code)

    def check_state(self, state: object) -> DebugExitState:
        """Validate `state` without touching the port."""
        checked = expect_state(state, DebugExitState, "debug-exit state")
        checked.validate()
        return checked

    def restore(self, state: DebugExitState) -> None:
        state = self.check_state(state)
        with self._lock:
            self.last_code = state.last_code
