"""One I/O thread for device work: epoll over eventfds (ioeventfd notifies, TAP, sockets).

vCPU threads never run device code; KVM signals an ioeventfd, this loop wakes and calls the
device. A callback that raises is logged (rate-limited, since a guest can trigger it) and the
loop carries on: one broken device must not take the others down. The loop body is on every
virtio request's path, so it talks to epoll directly and keeps per-event work to a dict lookup.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from typing import Any, Callable

from kvmpy import sandbox
from kvmpy.errors import KvmpyError

from kvmpy.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)


class EventLoop:
    """A selector loop on its own thread. All methods except `run` are thread-safe."""

    def __init__(self, name: str = "kvmpy-io"):
        self.name = name
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], Any]] = {}
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._pending: deque[tuple[Callable[..., Any], tuple[Any, ...]]] = deque()
        self._timers: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._timer_seq = itertools.count()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._errlog = RateLimitedLog(log)
        self.callback_errors = 0
        self._hold = threading.Lock()
        self._held: threading.Event | None = None   # set by release(); see quiesce()
        self.sandbox = sandbox.inherited()   # the building thread's machine policy (kvmpy.sandbox)

    # -- registration -------------------------------------------------------------------------
    def add_reader(self, fd: int, callback: Callable[[], Any]) -> None:
        """Call `callback()` on this loop's thread whenever `fd` is readable."""
        with self._lock:
            if fd in self._callbacks or fd == self._wake_fd:
                raise KvmpyError("adding a reader to the event loop", detail=f"fd {fd} is already registered")
            try:
                self._epoll.register(fd, select.EPOLLIN)
            except (ValueError, OSError) as e:
                raise KvmpyError("adding a reader to the event loop",
                                 errno=getattr(e, "errno", None), detail=f"fd {fd}: {e}") from None
            self._callbacks[fd] = callback
        self._wake()

    def add_eventfd(self, fd: int, callback: Callable[[], Any]) -> None:
        """Like add_reader, but drains the eventfd counter before calling back."""
        def drain_then_call() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            callback()
        self.add_reader(fd, drain_then_call)

    def remove_reader(self, fd: int) -> bool:
        with self._lock:
            if self._callbacks.pop(fd, None) is None:
                return False
            try:
                self._epoll.unregister(fd)
            except (ValueError, OSError):
                pass  # already closed: the kernel dropped it from the epoll set itself
        self._wake()
        return True

    def call_soon_threadsafe(self, callback: Callable[..., Any], *args: Any) -> None:
        self._pending.append((callback, args))
        self._wake()

    def call_later(self, delay: float, callback: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay), next(self._timer_seq),
                                          callback, args))
        self._wake()

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise KvmpyError("starting the event loop", detail="already started")
        self._thread = threading.Thread(target=self.run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> None:
        """Ask the loop to finish and wait for its thread (unless called from it)."""
        self._stopping = True
        self.release()
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout)

    def close(self) -> None:
        self.stop()
        self._epoll.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)
            self._wake_fd = -1

    def quiesce(self, timeout: float | None = 5.0) -> bool:
        """Hold the loop thread between two callbacks until `release()`: no virtqueue request is
        half done and no device timer fires while the machine's state is taken. Returns True
        once the loop is held (or is not running at all); False if it did not get there in time.
        Notifies, timers and posted callbacks that arrive meanwhile wait and run after release.
        Called on the loop thread itself, it returns True at once: nothing else can run."""
        if not self.running or threading.current_thread() is self._thread:
            return True
        with self._hold:
            if self._held is not None:
                return True
            entered, release = threading.Event(), threading.Event()
            self._held = release

        def hold() -> None:
            entered.set()
            release.wait()
        self.call_soon_threadsafe(hold)
        if entered.wait(timeout):
            return True
        self.release()
        return False

    def release(self) -> None:
        """Let a quiesced loop carry on."""
        with self._hold:
            release, self._held = self._held, None
        if release is not None:
            release.set()

    @property
    def quiesced(self) -> bool:
        return self._held is not None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run(self) -> None:
        """The loop body; `start()` runs it on a thread, tests may call it directly."""
        if threading.current_thread() is self._thread:
            sandbox.enter("io", self.sandbox)
        poll, callbacks, wake_fd = self._epoll.poll, self._callbacks, self._wake_fd
        while not self._stopping:
            for fd, _ in poll(self._next_timeout()):
                if fd == wake_fd:
                    try:
                        os.eventfd_read(wake_fd)
                    except BlockingIOError:
                        pass
                    continue
                cb = callbacks.get(fd)
                if cb is None:
                    continue  # removed by another thread after epoll reported it
                try:
                    cb()
                except Exception:
                    self._failed(f"fd {fd}")
            if self._timers:
                self._run_timers()
            while self._pending:
                cb, args = self._pending.popleft()
                self._invoke(cb, args, getattr(cb, "__qualname__", repr(cb)))
        self._stopping = False

    # -- internals ----------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._wake_fd >= 0:
            try:
                os.eventfd_write(self._wake_fd, 1)
            except OSError:
                pass

    def _next_timeout(self) -> float | None:
        if self._pending:
            return 0.0
        if not self._timers:  # call_later wakes us after pushing, so a racing timer is not lost
            return None
        with self._lock:
            if not self._timers:
                return None
            return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_timers(self) -> None:
        now = time.monotonic()
        due = []
        with self._lock:
            while self._timers and self._timers[0][0] <= now:
                due.append(heapq.heappop(self._timers))
        for _, _, cb, args in due:
            self._invoke(cb, args, getattr(cb, "__qualname__", repr(cb)))

    def _invoke(self, cb: Callable[..., Any], args: tuple[Any, ...], what: str) -> None:
        try:
            cb(*args)
        except Exception:  # isolate: a device's bug must not kill the I/O thread
            self._failed(what)

    def _failed(self, what: str) -> None:
        """Count and log (rate-limited) the exception being handled; the loop carries on."""
        self.callback_errors += 1
        self._errlog.log(logging.ERROR, what, "event loop callback %s failed", what, exc_info=True)
