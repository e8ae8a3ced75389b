"""What keeps a migration's downtime short beyond doing less work: no garbage collection in it,
and the state captured (source) and restored (destination) while the last pages travel.

CPython's cyclic collector runs when allocations pass a threshold, wherever that happens; a full
collection of a VMM's heap under nested TCG (about 60x this host's cost per Python step) is tens
of milliseconds, and the switchover (the source's state capture, the destination's decode and
restore) allocates hundreds of objects. Reference counting still frees everything that is not a
cycle meanwhile; the collector runs again as soon as the window closes.
"""
from __future__ import annotations

import gc
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

_lock = threading.Lock()
_holders = 0        # nested or concurrent windows: the collector comes back when the last closes
_was_enabled = False


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the block (reference counting goes on)."""
    global _holders, _was_enabled
    with _lock:
        if _holders == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0 and _was_enabled:
                gc.enable()


SWITCHOVER_SWITCH_INTERVAL_S = 0.0005   # the GIL's hand-over interval inside a switchover window
_interval_holders = 0
_interval_was = 0.005


@contextmanager
def quick_gil_handoffs() -> Iterator[None]:
    """A short GIL switch interval inside the block (restored when the last window closes).
    Why: the switchover overlaps Python work (the state's capture or restore, Overlapped) with
    the pages, whose thread drops the GIL for every C copy and socket call and must get it back
    after each; at CPython's 5 ms interval it waited for the Python thread's whole slice every
    time, and in L1 the last pages took twice as long as alone."""
    global _interval_holders, _interval_was
    with _lock:
        if _interval_holders == 0:
            _interval_was = sys.getswitchinterval()
            sys.setswitchinterval(min(_interval_was, SWITCHOVER_SWITCH_INTERVAL_S))
        _interval_holders += 1
    try:
        yield
    finally:
        with _lock:
            _interval_holders -= 1
            if _interval_holders == 0:
                sys.setswitchinterval(_interval_was)


class Overlapped:
    """A piece of the switchover run on its own thread while the migration thread goes on with
    the pages (whose C copies and socket calls release the GIL); `result()` waits for it and
    raises its error on the caller's thread."""

    def __init__(self, work: Callable[[], Any], name: str):
        self._work = work
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._work()
        except BaseException as exc:        # raised again on the caller's thread by result()
            self._error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        """Wait for the work (a failed switchover, before anything else touches the machine)."""
        self._thread.join()

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value


class StateCapture(Overlapped):
    """The paused source's STATE payload, captured on its own thread while the migration thread
    sends the last dirty pages, and written into the stream between two of their chunks once it
    is ready. Why: the capture (vCPU ioctls, every device's state, the encoding) was 24-65 ms
    of the switchover in L1 before the first page went. STATE still goes early, so the
    destination restores it while the rest of the pages travel (kvmpy.migrate.receive takes
    pages after it; kvmpy.migrate.incoming restores on a thread of its own).

    The capture must not write guest RAM unseen: the engine takes the userspace dirty marks
    once more after `write` (kvmpy's own writes; KVM's log cannot change with every vCPU parked,
    nor vhost's once pause() quiesced it)."""

    def __init__(self, capture: Callable[[], bytes]):
        super().__init__(capture, "kvmpy-migrate-state")
        self.written = False

    def write_if_ready(self, writer: Any) -> None:
        """Between two chunks: STATE into the stream if the capture is done (not waiting)."""
        if not self.written and self.done:
            self.write(writer)

    def write(self, writer: Any) -> None:
        """STATE into the stream (once), waiting for the capture; its error, raised here."""
        if self.written:
            return
        payload = self.result()
        from kvmpy.migrate.stream import SectionKind
        writer.write_section(SectionKind.STATE, payload)
        self.written = True
