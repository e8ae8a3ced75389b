"""The in-process API's exit hooks: a few lines of Python become a device on the port or MMIO bus.

A HookDevice is an ordinary bus device (offset, data) that translates to the researcher's
spelling (absolute address, size, integer value). A hook that raises does not kill the vCPU: the
access reads as all-ones / is dropped, and the error is logged (rate-limited: the guest decides
how often it happens).
"""
from __future__ import annotations

import logging
from typing import Callable

from kvmpy.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_limited = RateLimitedLog(log)

ReadHook = Callable[[int, int], int]
WriteHook = Callable[[int, int, int], None]


class HookDevice:
    def __init__(self, base: int, read: ReadHook | None, write: WriteHook | None):
        self.base = base
        self.read_hook = read
        self.write_hook = write

    def read(self, offset: int, size: int) -> bytes:
        if self.read_hook is None:
            return b"\xff" * size
        try:
            value = int(self.read_hook(self.base + offset, size))
        except Exception:
            _limited.log(logging.ERROR, ("hook-read", self.base), "read hook at %#x failed",
                         self.base + offset, exc_info=True)
            return b"\xff" * size
        return (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        if self.write_hook is None:
            return
        try:
            self.write_hook(self.base + offset, len(data), int.from_bytes(data, "little"))
        except Exception:
            _limited.log(logging.ERROR, ("hook-write", self.base), "write hook at %#x failed",
                         self.base + offset, exc_info=True)

    def __repr__(self) -> str:
        return f"HookDevice({self.base:#x})"
