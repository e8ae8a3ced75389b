"""The live migration's connection: one stream socket carrying the stream out (a file object
for StreamWriter, rate-limited to max-bandwidth, counting what it sent) and the destination's
one-line replies back; cancel() unblocks either from another thread."""
from __future__ import annotations

import socket
import threading
import time
from typing import Any

from kvmpy.errors import MigrationError

# the destination's one-line replies (and the source's GO): kvmpy.migrate.precopy tells when
ACCEPT, REFUSE, LOADED, FAILED, GO = b"KVMPY-ACCEPT", b"KVMPY-REFUSE", b"KVMPY-LOADED", b"KVMPY-FAILED", b"KVMPY-GO"
SYNCED = b"KVMPY-SYNCED"
OFFER_SYNC = "sync"             # ACCEPT's text: the destination answers SYNC sections
MAX_REPLY = 1024
REPLY_TIMEOUT_S = 60.0          # the destination checks the config / loads the state meanwhile
IO_TIMEOUT_S = 30.0             # a peer that takes nothing for this long is gone
RATE_WINDOW_S = 0.1             # max-bandwidth is enforced per window, as QEMU's rate limiter


class Cancelled(MigrationError):
    """migrate_cancel: not a failure of either side."""


class Channel:
    """One connected stream socket: the stream out (a file object for StreamWriter, rate-limited
    to max-bandwidth, counting bytes) and the destination's reply lines back."""

    def __init__(self, sock: socket.socket, max_bandwidth: int = 0, io_timeout_s: float = IO_TIMEOUT_S):
        self.sock = sock
        self.max_bandwidth = max_bandwidth      # bytes/s, 0: unlimited
        self.bytes_sent = 0
        self._cancelled = threading.Event()
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._rx = b""
        sock.settimeout(io_timeout_s)

    # file-object protocol for StreamWriter
    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        if self._cancelled.is_set():
            raise Cancelled("migration cancelled")
        self._throttle(len(view))
        try:
            self.sock.sendall(view)
        except OSError as exc:
            if self._cancelled.is_set():
                raise Cancelled("migration cancelled") from None
            if isinstance(exc, socket.timeout):
                raise MigrationError("sending the migration stream",
                                     detail="the destination took nothing for too long") from None
            raise MigrationError("sending the migration stream", errno=exc.errno,
                                 detail="the connection to the destination failed") from None
        self.bytes_sent += len(view)
        return len(view)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return self.bytes_sent

    def fileno(self) -> int:
        return self.sock.fileno()

    def seekable(self) -> bool:
        return False

    def _throttle(self, size: int) -> None:
        if not self.max_bandwidth:
            return
        now = time.monotonic()
        if now - self._window_start >= RATE_WINDOW_S:
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += size
        budget = self.max_bandwidth * RATE_WINDOW_S
        if self._window_bytes > budget:
            wait = self._window_start + self._window_bytes / self.max_bandwidth - now
            if wait > 0 and self._cancelled.wait(wait):     # cancel() wakes it at once
                raise Cancelled("migration cancelled")

    def read_reply(self, timeout_s: float = REPLY_TIMEOUT_S) -> tuple[bytes, str]:
        """The destination's next line: (word, the rest as text)."""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._rx:
            if len(self._rx) > MAX_REPLY:
                raise MigrationError("reading the destination's reply", detail="an over-long line")
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationError("reading the destination's reply", detail=f"no answer within {timeout_s:g} s")
            self.sock.settimeout(min(left, IO_TIMEOUT_S))
            try:
                data = self.sock.recv(MAX_REPLY)
            except socket.timeout:
                continue
            except OSError as exc:
                if self._cancelled.is_set():
                    raise Cancelled("migration cancelled") from None
                raise MigrationError("reading the destination's reply", errno=exc.errno) from None
            finally:
                self.sock.settimeout(IO_TIMEOUT_S)
            if self._cancelled.is_set():
                raise Cancelled("migration cancelled")
            if not data:
                raise MigrationError("reading the destination's reply",
                                     detail="the destination closed the connection")
            self._rx += data
        line, _, self._rx = self._rx.partition(b"\n")
        word, _, rest = line.partition(b" ")
        return word, rest.decode("ascii", errors="replace")[:500]

    def send_line(self, word: bytes, text: str = "") -> None:
        line = word + (b" " + text.encode("ascii", errors="replace")[:500] if text else b"") + b"\n"
        self.sock.sendall(line)

    def cancel(self) -> None:
        """Unblock a send or a wait on the destination (from another thread)."""
        self._cancelled.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def close(self) -> None:
        self.sock.close()
