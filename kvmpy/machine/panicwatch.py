"""Watches the guest console for a Linux panic line, so a panic-then-reboot (panic=-1) ends
kvmpy with a non-zero status and the panic's own words instead of looking like a clean reboot.

PCs give the host no other panic signal without a pvpanic device; this costs one byte compare
per console byte on the exit path.
"""
from __future__ import annotations

from typing import Callable

PANIC_MARK = b"Kernel panic - not syncing"
MAX_LINE = 512


class PanicWatch:
    """An output sink that forwards every byte to `forward` and remembers the first panic line."""

    def __init__(self, forward: Callable[[bytes], None]):
        self.forward = forward
        self.line: str | None = None
        self._buf = bytearray()

    def write(self, data: bytes) -> None:
        self.forward(data)
        if self.line is not None:
            return
        buf = self._buf
        for byte in data:
            if byte == 10:
                if PANIC_MARK in buf:
                    text = bytes(buf[buf.find(PANIC_MARK):]).decode("utf-8", "replace").strip()
                    self.line = text
                buf.clear()
            elif len(buf) < MAX_LINE:
                buf.append(byte)
