"""A disk image's flock, and its handover during live migration on shared storage.

Two VMs must never write one image: VirtioBlk holds flock (exclusive, or shared when read-only)
for as long as it has the image open. Live migration moves that right between two processes:
the destination opens the image while the source still runs (within `lock_handover()` a
writable image opens with its lock pending: not taken, whoever holds it), the source `unlock()`s
once the destination has confirmed, and the destination `take()`s the lock before its guest runs.
Whoever lacks the lock must not touch the image (VirtioBlk leaves requests in the ring until it
gets it back). The destination never takes the lock early, as QEMU's incoming images stay inactive
until the switchover: a destination started before its source (tier 2 starts both at once) once
took it and the source then failed to start ("in use by another VM").
"""
from __future__ import annotations

import errno
import fcntl
import threading
import time
from contextlib import contextmanager
from typing import Iterator

from kvmpy.errors import DeviceError

_handover = threading.local()


@contextmanager
def lock_handover() -> Iterator[None]:
    """On this thread, within the block, writable images open with their lock pending, and a
    read-only one locked by a writer too (a live migration's destination is built before the
    source hands its disks over)."""
    _handover.active = True
    try:
        yield
    finally:
        _handover.active = False


class ImageLock:
    """flock on `fd` at construction: DeviceError ("in use by another VM") when someone else
    holds it. Inside lock_handover() a writable image's lock is left `pending` (not tried), a
    read-only image's shared lock is taken, or left pending while a writer holds it."""

    def __init__(self, fd: int, readonly: bool, path: str):
        self.fd, self.readonly, self.path = fd, readonly, path
        self.pending = False
        if getattr(_handover, "active", False) and not readonly:
            self.pending = True     # a destination's image: the lock comes with the switchover
            return
        try:
            self._flock()
        except OSError as e:
            busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
            if not (busy and getattr(_handover, "active", False)):
                raise DeviceError(f"locking disk image {path!r}", errno=e.errno,
                                  detail="it is in use by another VM" if busy else None) from None
            self.pending = True

    def _flock(self) -> None:
        fcntl.flock(self.fd, (fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX) | fcntl.LOCK_NB)

    def unlock(self) -> None:
        """Give the lock up (a migration source, once the destination confirmed)."""
        if not self.pending:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            self.pending = True

    def take(self, timeout_s: float = 0.0) -> None:
        """Get the lock (back), retrying for `timeout_s`; DeviceError while another VM holds it."""
        deadline = time.monotonic() + timeout_s
        while self.pending:
            try:
                self._flock()
                self.pending = False
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                    raise DeviceError(f"locking disk image {self.path!r}", errno=e.errno,
                                      detail="it is still in use by another VM") from None
                time.sleep(0.02)
