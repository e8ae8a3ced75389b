"""Debug-exit port, compatible with QEMU's isa-debug-exit, so test guests can end kvmpy with a
status of their choosing.

A write of value v (1 to 4 bytes, little-endian, at offset 0) calls `on_exit(code)` with
code = (v << 1) | 1, QEMU's convention: the result is always odd, so a guest can never fake a
clean exit 0, and "v = 0" means success-by-convention (status 1). The code is passed whole; a
process exit status keeps only its low 8 bits (the CLI's business). Default port 0x501.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from kvmpy.errors import StateError
from kvmpy.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

DEBUG_EXIT_PORT = 0x501
DEBUG_EXIT_WIDTH = 4     # register length: a 32-bit write at the base is accepted


def exit_code_for(value: int) -> int:
    """The code a guest write of `value` produces (QEMU's (v << 1) | 1)."""
    return (value << 1) | 1


@dataclass
class DebugExitState:
    last_code: int | None = None

    def validate(self) -> None:
        if self.last_code is not None and (type(self.last_code) is not int
                                           or self.last_code < 1 or not self.last_code & 1
                                           or self.last_code >= 1 << 33):
            raise StateError("restoring debug-exit state", detail=f"last_code={self.last_code!r}")


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None]):
        self.on_exit = on_exit
        self._lock = threading.Lock()
        self.last_code: int | None = None

    def __repr__(self) -> str:
        return "DebugExit()"

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not 1 <= len(data) <= 4:
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

    def restore(self, state: DebugExitState) -> None:
        if not isinstance(state, DebugExitState):
            raise StateError("restoring debug-exit state", detail=f"got {type(state).__name__}")
        state.validate()
        with self._lock:
            self.last_code = state.last_code
