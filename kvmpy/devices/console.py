"""Console backends behind a UART: stdio (raw tty with a Ctrl-A escape), file, unix socket, null.

Threading model (the composer needs nothing from its event loop):
- Output: `Console.write(data)` is the UART's output sink. It only appends to a bounded buffer;
  a flusher thread writes the buffer out `flush_delay_s` after the first pending byte, so a
  guest printing one byte per port exit costs one write syscall per few milliseconds, not one
  per byte, and interactive echo is delayed by at most that much.
- Input: `start(target, on_quit)` starts one reader thread that select()s on the backend's fd
  and a wake-up pipe, and pushes bytes into `target.enqueue_input`, waiting on
  `target.wait_for_input_space` when the UART's backlog is full (backpressure, no loss).
- `close()` stops both threads, flushes, and restores the terminal. Use it (or `with`).

Spec strings (`open_console`): "stdio", "null", "file:PATH" (output only, truncated),
"unix:PATH" (listening socket, one client at a time; output is dropped while nobody is
connected; a second client is told "busy" and disconnected).

`open_console(spec, lazy=True)` builds the console without touching the filesystem: the file
is truncated / the socket bound only by `open()` (or `start()`), so a machine opens its outputs
after every check passed and every input is open (a failed start-up loses no log and leaves no
socket behind). Output written before then waits in the buffer.
"""
from __future__ import annotations

import errno
import logging
import os
import select
import threading
from typing import Callable, Protocol

from kvmpy.errors import ConfigError
from kvmpy.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_limited = RateLimitedLog(log)

CTRL_A = 0x01
DEFAULT_FLUSH_DELAY_S = 0.003
DEFAULT_MAX_PENDING = 1 << 20
HELP_TEXT = (b"\r\nkvmpy console escapes:\r\n"
             b"  C-a h    print this help\r\n"
             b"  C-a x    exit kvmpy\r\n"
             b"  C-a C-a  send C-a to the guest\r\n")


class InputTarget(Protocol):
    """Where console input goes: a UART (see Serial16550)."""

    def enqueue_input(self, data: bytes) -> int: ...

    def wait_for_input_space(self, timeout: float | None = None) -> bool: ...


class Console:
    """Base backend: buffered output with a flusher thread, optional input reader thread."""

    def __init__(self, flush_delay_s: float = DEFAULT_FLUSH_DELAY_S,
                 max_pending: int = DEFAULT_MAX_PENDING):
        self.flush_delay_s = flush_delay_s
        self.max_pending = max_pending
        self.dropped_bytes = 0
        self._pending = bytearray()
        self._cond = threading.Condition()
        self._out_lock = threading.Lock()
        self._flusher: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self._closing = False
        self._target: InputTarget | None = None
        self._on_quit: Callable[[], None] = lambda: None
        self._opened = True        # lazy backends: False until open() (output waits buffered)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    # -- output ------------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """UART output sink: buffer `data` (dropped, and counted, if the buffer is full)."""
        with self._cond:
            if self._closing:
                return
            if len(self._pending) + len(data) > self.max_pending:
                self.dropped_bytes += len(data)
                _limited.warning(("console", "full"), "console output buffer full, dropping")
                return
            was_empty = not self._pending
            self._pending += data
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                                 name=f"{type(self).__name__}-out")
                self._flusher.start()
            elif was_empty:
                self._cond.notify()

    def flush(self) -> None:
        """Write out everything pending now (nothing while a lazy backend is not open yet)."""
        with self._out_lock:
            with self._cond:
                if not self._opened:
                    return
                data = bytes(self._pending)
                self._pending.clear()
            if data:
                self._emit(data)

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not (self._pending and self._opened) and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._cond.wait(self.flush_delay_s)   # let a burst of single bytes gather
            self.flush()

    def _emit(self, data: bytes) -> None:
        try:
            self._write_out(data)
        except OSError as e:
            _limited.warning(("console", "write", e.errno), "console output failed: %s", e)

    def _write_out(self, data: bytes) -> None:
        """Backend hook: write `data` out, blocking."""
        raise NotImplementedError

    # -- opening (lazy backends) -----------------------------------------------------------

    def open(self) -> None:
        """Create/bind the backend now (idempotent); raises ConfigError with the reason."""
        with self._cond:
            if self._opened or self._closing:
                return
        self._open_backend()
        with self._cond:
            self._opened = True
            self._cond.notify_all()

    def _open_backend(self) -> None:
        """Backend hook for lazy consoles: open the file / bind the socket."""

    # -- input -------------------------------------------------------------------------------

    def start(self, target: InputTarget | None = None,
              on_quit: Callable[[], None] | None = None) -> None:
        """Open the backend if it is not yet, then start feeding input into `target`;
        `on_quit` is called when the user asks to quit (stdio's C-a x), from the reader thread."""
        self.open()
        self._target = target
        if on_quit is not None:
            self._on_quit = on_quit
        if self._has_input() and self._reader is None:
            self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                            name=f"{type(self).__name__}-in")
            self._reader.start()

    def _has_input(self) -> bool:
        return False

    def _read_loop(self) -> None:
        raise NotImplementedError

    def _deliver(self, data: bytes) -> None:
        """Push `data` into the target, waiting (not dropping) while its backlog is full."""
        target = self._target
        while data and target is not None and not self._closing:
            taken = target.enqueue_input(data)
            data = data[taken:]
            if data:
                target.wait_for_input_space(0.1)

    def _wait_readable(self, fds: list[int]) -> list[int]:
        ready, _, _ = select.select([self._wake_r, *fds], [], [])
        if self._wake_r in ready:
            return []
        return ready

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop threads, flush what is pending, release the backend. Idempotent."""
        with self._cond:
            if self._closing:
                return
        self.flush()
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        for thread in (self._flusher, self._reader):
            if thread is not None and thread is not threading.current_thread():
                thread.join(2.0)
        self.flush()
        if self._opened:
            self._release()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _release(self) -> None:
        """Backend hook: close fds, restore state."""

    def __enter__(self) -> "Console":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullConsole(Console):
    """Discards output, never produces input."""

    def write(self, data: bytes) -> None:
        pass

    def _write_out(self, data: bytes) -> None:
        pass


class FileConsole(Console):
    """Output to a file (truncated on open); no input. A FIFO or a character device (/dev/null,
    a tty) is written as is; a FIFO nobody reads is refused at once instead of blocking open()."""

    def __init__(self, path: str, lazy: bool = False, **kw: float):
        super().__init__(**kw)
        self.path = path
        self._fd = -1
        self._opened = False
        if not lazy:
            self.open()

    def _open_backend(self) -> None:
        path = self.path
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        except OSError as e:
            detail = "it is a FIFO that nobody reads" if e.errno == errno.ENXIO else None
            raise ConfigError(f"opening console file {path!r}", errno=e.errno, detail=detail) from None
        os.set_blocking(fd, True)   # O_NONBLOCK was for open() only: the flusher may block
        self._fd = fd

    def _write_out(self, data: bytes) -> None:
        _write_all(self._fd, data)

    def _release(self) -> None:
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


UNIX_PATH_MAX = 107   # sockaddr_un.sun_path is 108 bytes with the terminating NUL


def check_socket_path(path: str) -> None:
    """Refuse a unix socket path the kernel cannot bind, saying why (bind's own error has no reason)."""
    size = len(os.fsencode(path))
    if size > UNIX_PATH_MAX:
        raise ConfigError(f"creating console socket {path!r}",
                          detail=f"the path is {size} bytes; a unix socket path may have at most "
                                 f"{UNIX_PATH_MAX} (use a shorter or relative path)")


def parse_console_spec(spec: str) -> tuple[str, str]:
    """"stdio", "null", "file:PATH" or "unix:PATH" -> (kind, path or ""); nothing is opened."""
    kind, sep, arg = spec.partition(":")
    if kind in ("stdio", "null") and not sep:
        return kind, ""
    if kind in ("file", "unix") and sep:
        if not arg:
            raise ConfigError(f"parsing console spec {spec!r}", detail=f"{kind}: needs a path")
        if kind == "unix":
            check_socket_path(arg)
        return kind, arg
    raise ConfigError(f"parsing console spec {spec!r}",
                      detail="expected stdio, null, file:PATH or unix:PATH")


def open_console(spec: str, lazy: bool = False) -> Console:
    """A console for `spec` (see parse_console_spec). With lazy=True the file is not truncated
    and the socket not bound until the console's open() or start()."""
    kind, path = parse_console_spec(spec)
    if kind == "stdio":
        from kvmpy.devices.console_stdio import StdioConsole
        return StdioConsole()
    if kind == "null":
        return NullConsole()
    if kind == "file":
        return FileConsole(path, lazy=lazy)
    from kvmpy.devices.console_unix import UnixSocketConsole
    return UnixSocketConsole(path, lazy=lazy)


def __getattr__(name: str) -> object:
    """`console.UnixSocketConsole` and `console.StdioConsole`, imported on first use: only
    unix-socket consoles pay for the socket module (start-up time under nesting), only stdio
    ones for termios and the terminal's signal handling."""
    if name == "UnixSocketConsole":
        from kvmpy.devices.console_unix import UnixSocketConsole
        return UnixSocketConsole
    if name == "StdioConsole":
        from kvmpy.devices.console_stdio import StdioConsole
        return StdioConsole
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
