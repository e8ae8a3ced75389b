"""When a live migration switches over, how auto-converge slows a guest that out-dirties the
link, and how a large dirty pass is cut into takes: the arithmetic of kvmpy.migrate.precopy,
apart so it is tested (and read) on its own."""
from __future__ import annotations

import logging
from typing import Any

from kvmpy.migrate.pages import PAGE_SIZE
from kvmpy.migrate.stream import CHUNK_PAGES

log = logging.getLogger(__name__)


def expected_downtime_ms(remaining_pages: int, bandwidth: float, fixed_ms: float = 0.0) -> float:
    """How long sending `remaining_pages` takes at `bandwidth` bytes/s (QEMU's expected-downtime),
    plus `fixed_ms` the switchover's pass pays whatever its size (reading the dirty log)."""
    if remaining_pages <= 0:
        return 0.0
    if bandwidth <= 0:
        return float("inf")
    return fixed_ms + remaining_pages * PAGE_SIZE / bandwidth * 1000.0


def converged(remaining_pages: int, bandwidth: float, downtime_limit_ms: float, fixed_ms: float = 0.0) -> bool:
    """Switch over once the dirty set fits the downtime limit at the measured bandwidth."""
    return expected_downtime_ms(remaining_pages, bandwidth, fixed_ms) <= downtime_limit_ms


def runqueue_wait_s(path: str = "/proc/thread-self/schedstat") -> float | None:
    """Seconds the calling thread has spent runnable but waiting for a CPU (the second field of
    its schedstat), or None where the kernel does not say. Why the migration wants it: while the
    guest runs, its vCPUs take CPUs from the migration thread (and the destination); at the
    switchover they are stopped, so the last pages go out faster than any pass measured (in L1,
    twice as fast). The time the thread waited for a CPU is the part of a pass's time that the
    switchover does not pay."""
    try:
        with open(path, "rb") as f:
            fields = f.read(200).split()
        return int(fields[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


BANDWIDTH_WINDOW_BYTES = 8 << 20    # passes measure the bandwidth once they sent this much together


class BandwidthMeter:
    """A live migration's bandwidth: bytes over the seconds from a pass's first write to the
    destination's SYNCED, over windows of passes (the first included) that sent
    BANDWIDTH_WINDOW_BYTES together (before the first fills: over everything so far). Windows:
    a pass of 214 pages in L1 was 680 ms of fixed costs (walk, SYNC round trip), 1.3 MB/s where
    the first pass measured 10, and an idle guest iterated for 120 s. The dirty log's read is
    not in it: it costs the same for 1 page or 10^5 (a fixed term of the expected downtime).

    `switch_bandwidth` is the same without the seconds the migration thread waited for a CPU
    (runqueue_wait_s), at most half of each pass's: what the switchover, with the guest
    stopped, can expect. `bandwidth` is what query-migrate reports."""

    def __init__(self) -> None:
        self.bandwidth = 0.0
        self.switch_bandwidth = 0.0
        self._bytes, self._seconds, self._waited = 0, 0.0, 0.0   # the window not yet measured
        self._filled = False

    def measure(self, sent: int, elapsed: float, waited: float = 0.0) -> None:
        self._bytes += sent
        self._seconds += elapsed
        self._waited += min(max(waited, 0.0), elapsed / 2)
        full = self._bytes >= BANDWIDTH_WINDOW_BYTES
        if full or not self._filled:
            self.bandwidth = self._bytes / max(self._seconds, 1e-6)
            self.switch_bandwidth = self._bytes / max(self._seconds - self._waited, 1e-6)
        if full:
            self._filled = True
            self._bytes, self._seconds, self._waited = 0, 0.0, 0.0


SWITCH_PAGES = 64       # a dirty set this small (256 KiB) goes at the switchover whatever its trend
SHRINK_NUMERATOR, SHRINK_DENOMINATOR = 3, 4     # another pass while it leaves at most 3/4 of the set


def worth_another_pass(left_pages: int, previous_pages: int) -> bool:
    """The dirty set fits the downtime limit: is one more pass, with the guest running, still
    worth it? Yes while each pass shrinks the set by a quarter at least: the switchover's pages
    are most of its downtime, and a pass that shrinks the set costs the guest nothing but time.
    A set that stops shrinking (the guest's working set, rewritten as fast as it is sent) or is
    tiny goes now; shrinking by a quarter bounds the extra passes by log_4/3 of RAM's pages, and
    their time by four times the first such pass's (a geometric series).

    Why not halving (the rule before): a guest rewriting 32 MiB in L1 dirties ~2/3 of what a
    pass sends in its time, so no pass halved it and the switchover took 2000-6000 pages
    (160-290 ms of its 190-350 ms); passes shrinking it by a third were left undone."""
    return left_pages > SWITCH_PAGES and left_pages * SHRINK_DENOMINATOR <= previous_pages * SHRINK_NUMERATOR


# QEMU's auto-converge parameters and defaults (qapi/migration.json)
THROTTLE_DEFAULTS = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
                     "throttle-trigger-threshold": 50}


def next_throttle(current: int, params: dict[str, Any]) -> int:
    """The vCPU throttle after the guest out-dirtied the link again: the initial percentage,
    then one increment more each time, at most max-cpu-throttle (QEMU's mig_throttle_guest_down)."""
    p = {**THROTTLE_DEFAULTS, **params}
    pct = p["cpu-throttle-initial"] if current == 0 else current + p["cpu-throttle-increment"]
    return max(0, min(int(pct), int(p["max-cpu-throttle"]), 99))


class AutoConverge:
    """auto-converge: after two passes in which the guest dirtied more than the trigger share of
    what was sent, slow its vCPUs down a step (and again after every two more), through the
    source's throttle(percent) where it has one; `percent` is query-migrate's
    cpu-throttle-percentage."""

    def __init__(self, source: Any, params: dict[str, Any]):
        self.source, self.params = source, params
        self.percent = 0
        self._high_dirty_passes = 0

    def after_pass(self, dirty_bytes: int, sent_bytes: int) -> None:
        if not dirtied_faster_than_sent(dirty_bytes, sent_bytes, self.params):
            return
        self._high_dirty_passes += 1
        if self._high_dirty_passes >= 2:
            self._high_dirty_passes = 0
            self.set(next_throttle(self.percent, self.params))

    def set(self, percent: int) -> None:
        if percent == self.percent:
            return
        self.percent = percent
        throttle = getattr(self.source, "throttle", None)
        if callable(throttle):
            throttle(percent)
        if percent:
            log.info("migration: auto-converge throttles the vCPUs by %d%%", percent)


def dirtied_faster_than_sent(dirty_bytes: int, sent_bytes: int, params: dict[str, Any]) -> bool:
    """QEMU's trigger: the pass's dirty bytes exceed throttle-trigger-threshold % of what it sent."""
    threshold = {**THROTTLE_DEFAULTS, **params}["throttle-trigger-threshold"]
    return dirty_bytes > sent_bytes * threshold / 100


def dirty_windows(tracker: Any, index: int, npages: int) -> list[tuple[int, int]]:
    """(first page, count) windows of range `index` for a large dirty pass: runs of consecutive
    CHUNK_PAGES-sized chunks, each window closed once it holds about CHUNK_PAGES dirty pages, and
    chunks with nothing dirty left out. Why: a guest rewriting 32 MiB spreads its pages over most
    chunks of RAM; a take (numpy work and a KVM_CLEAR_DIRTY_LOG) and a stream chunk per address
    chunk was ~128 of each per pass, where ~8 carry the same pages. A window's pages are still
    cleared just before they are copied, so the guest's writes meanwhile re-dirty few of them."""
    counts_of = getattr(tracker, "dirty_counts", None)
    if counts_of is None:           # a tracker without counts: every chunk on its own
        chunks = getattr(tracker, "dirty_chunks", None)
        firsts = chunks(index, CHUNK_PAGES) if chunks is not None else range(0, npages, CHUNK_PAGES)
        return [(first, CHUNK_PAGES) for first in firsts]
    windows: list[tuple[int, int]] = []
    start, held = -1, 0
    for chunk, count in enumerate(counts_of(index, CHUNK_PAGES).tolist()):
        if not count:
            if start >= 0:
                windows.append((start * CHUNK_PAGES, (chunk - start) * CHUNK_PAGES))
                start, held = -1, 0
            continue
        if start < 0:
            start = chunk
        held += count
        if held >= CHUNK_PAGES:
            windows.append((start * CHUNK_PAGES, (chunk + 1 - start) * CHUNK_PAGES))
            start, held = -1, 0
    if start >= 0:
        windows.append((start * CHUNK_PAGES, -(-npages // CHUNK_PAGES) * CHUNK_PAGES - start * CHUNK_PAGES))
    return windows
