"""The stdio console backend: stdin/stdout, with a tty put in raw mode and C-a as an escape key.
Kept apart from kvmpy.devices.console (as the unix-socket backend is) so that only a machine
with a stdio console imports termios and installs signal handlers for the terminal."""
from __future__ import annotations

import atexit
import errno
import os
import signal
import termios
import threading
from typing import Callable

from kvmpy.devices.console import CTRL_A, HELP_TEXT, Console, InputTarget, _write_all, log


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
