"""What keeps a migration's downtime short beyond doing less work: no garbage collection in it.

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
from typing import Iterator

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
