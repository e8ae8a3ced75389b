"""Rate-limited logging for anything a guest can trigger.

A hostile or buggy guest can hit an unknown register millions of times a second; logging each
one would drown the host log and slow the vCPU exit path. `RateLimitedLog` keeps a token bucket
per message key (bounded number of keys) and reports how many messages it suppressed the next
time a key is allowed through.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Callable


class RateLimitedLog:
    """Token bucket per key: `burst` messages at once, then one every `interval_s` seconds.

    Keys are whatever identifies "the same message" (e.g. ("serial", "bad-offset")). At most
    `max_keys` keys are tracked; the least recently used is forgotten first, so a guest cannot
    grow this without bound by varying the key.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 5.0, burst: int = 5,
                 max_keys: int = 256, clock: Callable[[], float] = time.monotonic):
        if interval_s <= 0 or burst < 1 or max_keys < 1:
            raise ValueError("interval_s must be > 0, burst and max_keys >= 1")
        self.logger = logger
        self.interval_s = interval_s
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        # key -> [tokens, last_refill_time, suppressed_count]
        self._buckets: OrderedDict[object, list[float]] = OrderedDict()

    def allow(self, key: object) -> tuple[bool, int]:
        """(may log now, how many were suppressed since the last allowed message)."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = [float(self.burst), now, 0.0]
                self._buckets[key] = bucket
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
                elapsed = now - bucket[1]
                if elapsed > 0:
                    bucket[0] = min(float(self.burst), bucket[0] + elapsed / self.interval_s)
                bucket[1] = now
            if bucket[0] >= 1.0:
                bucket[0] -= 1.0
                suppressed = int(bucket[2])
                bucket[2] = 0.0
                return True, suppressed
            bucket[2] += 1
            return False, 0

    def log(self, level: int, key: object, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Log `msg % args` at `level` unless `key` is over its budget. Returns whether it
        logged. The formatting is only done when the message is emitted."""
        if not self.logger.isEnabledFor(level):
            return False
        ok, suppressed = self.allow(key)
        if not ok:
            return False
        if suppressed:
            self.logger.log(level, msg + " (%d similar messages suppressed)", *args, suppressed,
                            exc_info=exc_info)
        else:
            self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def warning(self, key: object, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def debug(self, key: object, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, key, msg, *args)
