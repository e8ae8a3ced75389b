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
"""
from __future__ import annotations

import atexit
import errno
import logging
import os
import select
import signal
import stat
import termios
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
        """Write out everything pending now."""
        with self._out_lock:
            with self._cond:
                data = bytes(self._pending)
                self._pending.clear()
            if data:
                self._emit(data)

    def _flush_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
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

    # -- input -------------------------------------------------------------------------------

    def start(self, target: InputTarget | None = None,
              on_quit: Callable[[], None] | None = None) -> None:
        """Start feeding input into `target`; `on_quit` is called when the user asks to quit
        (stdio's C-a x), from the reader thread."""
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
    """Output to a file (truncated on open); no input."""

    def __init__(self, path: str, **kw: float):
        super().__init__(**kw)
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ConfigError(f"opening console file {path!r}", errno=e.errno) from e

    def _write_out(self, data: bytes) -> None:
        _write_all(self._fd, data)

    def _release(self) -> None:
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class StdioConsole(Console):
    """stdin/stdout. A tty stdin is put in raw mode (C-c goes to the guest) and C-a becomes an
    escape key (C-a x quits, C-a C-a sends C-a, C-a h prints help); pipes pass through
    untouched. The terminal is restored by close(), at interpreter exit, on C-a x, and on
    SIGTERM/SIGHUP/SIGQUIT (after which the previous handler runs)."""

    RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)

    def __init__(self, stdin_fd: int = 0, stdout_fd: int = 1, escape: int = CTRL_A,
                 **kw: float):
        super().__init__(**kw)
        self.stdin_fd = stdin_fd
        self.stdout_fd = stdout_fd
        self.escape = escape
        self.is_tty = os.isatty(stdin_fd)
        self._saved_attrs: list | None = None
        self._saved_handlers: dict[int, object] = {}
        self._restore_lock = threading.RLock()   # a signal may land while main holds it
        self._escape_pending = False
        self._stdout_broken = False

    @property
    def raw_mode(self) -> bool:
        return self._saved_attrs is not None

    def start(self, target: InputTarget | None = None,
              on_quit: Callable[[], None] | None = None) -> None:
        if self.is_tty and self._saved_attrs is None:
            self._enter_raw()
        super().start(target, on_quit)

    def _has_input(self) -> bool:
        return True

    def _enter_raw(self) -> None:
        try:
            saved = termios.tcgetattr(self.stdin_fd)
        except termios.error as e:
            log.warning("stdin looks like a tty but tcgetattr failed (%s); staying cooked", e)
            return
        raw = list(saved)
        raw[6] = list(saved[6])
        raw[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                    | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON)
        raw[2] = (raw[2] & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
        raw[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG
                    | termios.IEXTEN)
        raw[6][termios.VMIN] = 1
        raw[6][termios.VTIME] = 0
        with self._restore_lock:
            self._saved_attrs = saved
            termios.tcsetattr(self.stdin_fd, termios.TCSANOW, raw)
            atexit.register(self.restore_terminal)
            if threading.current_thread() is threading.main_thread():
                for signum in self.RESTORE_SIGNALS:
                    self._saved_handlers[signum] = signal.signal(signum, self._on_signal)
            else:
                log.debug("not on the main thread: terminal restored on exit/close only")

    def restore_terminal(self) -> None:
        """Put the terminal back as it was (idempotent)."""
        with self._restore_lock:
            saved, self._saved_attrs = self._saved_attrs, None
            if saved is None:
                return
            try:
                termios.tcsetattr(self.stdin_fd, termios.TCSANOW, saved)
            except termios.error as e:
                log.warning("could not restore the terminal: %s", e)
            atexit.unregister(self.restore_terminal)
            if threading.current_thread() is threading.main_thread():
                for signum, handler in self._saved_handlers.items():
                    signal.signal(signum, handler)  # type: ignore[arg-type]
                self._saved_handlers.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        previous = self._saved_handlers.get(signum, signal.SIG_DFL)
        self.restore_terminal()
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)   # default handler is back: die the usual way

    def _write_out(self, data: bytes) -> None:
        if self._stdout_broken:
            return
        try:
            _write_all(self.stdout_fd, data)
        except BrokenPipeError:
            self._stdout_broken = True
            log.warning("console stdout closed; dropping further guest output")

    def _read_loop(self) -> None:
        while not self._closing:
            if not self._wait_readable([self.stdin_fd]):
                return
            try:
                data = os.read(self.stdin_fd, 4096)
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EINTR):
                    continue
                log.warning("console stdin read failed: %s", e)
                return
            if not data:
                return   # EOF on a pipe: the guest simply gets no more input
            if self.raw_mode:
                data, quit_requested = self._filter_escapes(data)
                self._deliver(data)
                if quit_requested:
                    self.restore_terminal()
                    self._on_quit()
                    return
            else:
                self._deliver(data)

    def _filter_escapes(self, data: bytes) -> tuple[bytes, bool]:
        out = bytearray()
        for byte in data:
            if self._escape_pending:
                self._escape_pending = False
                if byte == self.escape:
                    out.append(byte)
                elif byte in b"xX":
                    return bytes(out), True
                elif byte in b"hH?":
                    self.write(HELP_TEXT)
                    self.flush()
                # anything else after the escape is swallowed, as QEMU does
            elif byte == self.escape:
                self._escape_pending = True
            else:
                out.append(byte)
        return bytes(out), False

    def _release(self) -> None:
        self.restore_terminal()


class UnixSocketConsole(Console):
    """A listening unix socket; one client at a time gets the guest's output and feeds input."""

    def __init__(self, path: str, **kw: float):
        super().__init__(**kw)
        self.path = path
        _claim_socket_path(path)
        import socket  # here, not at module level: only unix-socket consoles pay for it
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(path)
            self._listener.listen(1)
        except OSError as e:
            self._listener.close()
            raise ConfigError(f"listening on console socket {path!r}", errno=e.errno) from e
        self._client: socket.socket | None = None

    def _has_input(self) -> bool:
        return True

    @property
    def connected(self) -> bool:
        return self._client is not None

    def _read_loop(self) -> None:
        while not self._closing:
            client = self._client
            fds = [self._listener.fileno()] + ([client.fileno()] if client else [])
            ready = self._wait_readable(fds)
            if not ready:
                return
            if self._listener.fileno() in ready:
                self._accept()
            if client is not None and client.fileno() in ready:
                try:
                    data = client.recv(4096)
                except OSError:
                    data = b""
                if data:
                    self._deliver(data)
                else:
                    self._client = None
                    client.close()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as e:
            _limited.warning(("console", "accept"), "console accept failed: %s", e)
            return
        if self._client is not None:
            try:
                conn.sendall(b"kvmpy console busy: another client is attached\r\n")
            except OSError:
                pass
            conn.close()
            return
        conn.settimeout(1.0)   # a client that stops reading is dropped, not waited on
        self._client = conn

    def _write_out(self, data: bytes) -> None:
        client = self._client
        if client is None:
            return
        try:
            client.sendall(data)
        except OSError:
            # The reader thread owns closing; shutting down makes its recv() return b"".
            try:
                import socket  # loaded already: a client exists
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _release(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _claim_socket_path(path: str) -> None:
    """Remove a stale socket left by a dead kvmpy; refuse a live one or a non-socket."""
    import socket
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"creating console socket {path!r}", detail="exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise ConfigError(f"creating console socket {path!r}",
                          detail="another process is listening on it")
    finally:
        probe.close()


def open_console(spec: str) -> Console:
    """Parse a console spec: "stdio", "null", "file:PATH" or "unix:PATH"."""
    kind, sep, arg = spec.partition(":")
    if kind in ("stdio", "null") and not sep:
        return StdioConsole() if kind == "stdio" else NullConsole()
    if kind in ("file", "unix") and sep:
        if not arg:
            raise ConfigError(f"parsing console spec {spec!r}", detail=f"{kind}: needs a path")
        return FileConsole(arg) if kind == "file" else UnixSocketConsole(arg)
    raise ConfigError(f"parsing console spec {spec!r}",
                      detail="expected stdio, null, file:PATH or unix:PATH")
