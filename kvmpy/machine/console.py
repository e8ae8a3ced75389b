"""The in-process API's console: everything the guest printed, kept in memory, with `expect()` for
tests and scripts and `write()` to type into the guest.

The backend (`CaptureConsole`) is a kvmpy.devices.console.Console like file: or unix:, chosen with
the console spec "capture" (the API's default). `GuestConsole` is the handle users hold: it
outlives guest reboots (the machine re-targets the backend's input at the new UART).
"""
from __future__ import annotations

import re
import threading
import time

from kvmpy.devices.console import Console, open_console
from kvmpy.errors import KvmpyError

MAX_CAPTURE = 64 << 20   # keep at most this much output (the oldest is dropped beyond it)


class ConsoleTimeout(KvmpyError):
    """expect() saw no match before its timeout."""


class CaptureConsole(Console):
    """Keeps the guest's output in memory. Input comes only from `type()` (no reader thread)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen = bytearray()
        self._dropped = 0          # bytes dropped from the front (MAX_CAPTURE)
        self._seen_cond = threading.Condition()

    def write(self, data: bytes) -> None:       # the UART's output sink: no flusher thread needed
        with self._seen_cond:
            self._seen += data
            if len(self._seen) > MAX_CAPTURE:
                cut = len(self._seen) - MAX_CAPTURE
                del self._seen[:cut]
                self._dropped += cut
            self._seen_cond.notify_all()

    def _write_out(self, data: bytes) -> None:
        self.write(data)

    def snapshot(self) -> tuple[bytes, int]:
        with self._seen_cond:
            return bytes(self._seen), self._dropped

    def type(self, data: bytes) -> None:
        """Deliver `data` to the guest's UART, waiting while its input backlog is full."""
        self._deliver(data)


class GuestConsole:
    """What `machine.console` is: the guest's output as text, `expect(regex)`, and `write()`."""

    def __init__(self, backend: CaptureConsole):
        self.backend = backend
        self._pos = 0              # absolute offset after the last match

    @property
    def data(self) -> bytes:
        return self.backend.snapshot()[0]

    @property
    def text(self) -> str:
        """Everything the guest printed so far (decoded leniently)."""
        return self.data.decode("utf-8", "replace")

    def write(self, data: bytes | str) -> None:
        """Type into the guest (str is UTF-8 encoded)."""
        self.backend.type(data.encode() if isinstance(data, str) else bytes(data))

    def expect(self, pattern: str | bytes | re.Pattern, timeout: float = 30.0) -> re.Match:
        """Wait until output printed after the previous match matches `pattern` (a regular
        expression; str patterns match the decoded text) and return the re.Match. Raises
        ConsoleTimeout with the tail of the output when nothing matches in time."""
        rx = pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)
        deadline = time.monotonic() + timeout
        cond = self.backend._seen_cond
        with cond:
            while True:
                seen, dropped = bytes(self.backend._seen), self.backend._dropped
                start = max(0, self._pos - dropped)
                hay = seen[start:]
                subject = hay if isinstance(rx.pattern, bytes) else hay.decode("utf-8", "replace")
                m = rx.search(subject)
                if m is not None:
                    end = m.end() if isinstance(rx.pattern, bytes) else len(subject[:m.end()].encode("utf-8", "replace"))
                    self._pos = dropped + start + end
                    return m
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = hay[-300:].decode("utf-8", "replace")
                    raise ConsoleTimeout("waiting for the guest console",
                                         detail=f"no match for {rx.pattern!r} within {timeout:g} s; last output: {tail!r}")
                cond.wait(left)


def console_for(spec: str) -> Console:
    """open_console's specs, plus "capture" (the API's default: kept in memory, expect()-able).
    Lazy: a file or socket is created only when the machine starts (Machine._open_consoles)."""
    if spec == "capture":
        return CaptureConsole()
    return open_console(spec, lazy=True)


class LateTarget:
    """Console input target resolved at delivery time (the UARTs are rebuilt on reboot)."""

    def __init__(self, get):
        self._get = get

    def enqueue_input(self, data: bytes) -> int:
        t = self._get()
        return t.enqueue_input(data) if t else len(data)

    def wait_for_input_space(self, timeout: float | None = None) -> bool:
        t = self._get()
        if t and hasattr(t, "wait_for_input_space"):
            return t.wait_for_input_space(timeout)
        time.sleep(timeout or 0.01)
        return True
