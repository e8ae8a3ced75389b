"""What keeps a migration's downtime short beyond doing less work: no garbage collection in it,
and the source's state captured while the last pages travel (StateCapture).

CPython's cyclic collector runs when allocations pass a threshold, wherever that happens; a full
collection of a VMM's heap under nested TCG (about 60x this host's cost per Python step) is tens
of milliseconds, and the switchover (the source's state capture, the destination's decode and
restore) allocates hundreds of objects. Reference counting still frees everything that is not a
cycle meanwhile; the collector runs again as soon as the window closes.
"""
from __future__ import annotations

import gc
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


class StateCapture:
    """The paused source's STATE payload, captured on its own thread while the migration thread
    sends the last dirty pages, and written into the stream between two of their chunks once it
    is ready. Why: the capture (vCPU ioctls, every device's state, the encoding) was 24-65 ms
    of the switchover in L1 before the first page went; the page copies and socket writes
    release the GIL, so the two overlap. STATE still goes early, so the destination restores
    it while the rest of the pages travel (kvmpy.migrate.receive takes pages after it).

    The capture must not write guest RAM unseen: the engine takes the userspace dirty marks
    once more after `write` (kvmpy's own writes; KVM's log cannot change with every vCPU parked,
    nor vhost's once pause() quiesced it)."""

    def __init__(self, capture: Callable[[], bytes]):
        self._capture = capture
        self._payload: bytes | None = None
        self._error: BaseException | None = None
        self.written = False
        self._thread = threading.Thread(target=self._run, name="kvmpy-migrate-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._payload = self._capture()
        except BaseException as exc:        # raised again on the migration thread by write()
            self._error = exc

    def write_if_ready(self, writer: Any) -> None:
        """Between two chunks: STATE into the stream if the capture is done (not waiting)."""
        if not self.written and not self._thread.is_alive():
            self.write(writer)

    def write(self, writer: Any) -> None:
        """STATE into the stream (once), waiting for the capture; its error, raised here."""
        if self.written:
            return
        self.join()
        if self._error is not None:
            raise self._error
        from kvmpy.migrate.stream import SectionKind
        assert self._payload is not None
        writer.write_section(SectionKind.STATE, self._payload)
        self.written = True

    def join(self) -> None:
        """Wait for the capture (a failed switchover, before the source resumes the guest)."""
        self._thread.join()
