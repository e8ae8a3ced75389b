"""When a live migration switches over, how auto-converge slows a guest that out-dirties the
link, and how a large dirty pass is cut into takes: the arithmetic of kvmpy.migrate.precopy,
apart so it is tested (and read) on its own."""
from __future__ import annotations

from typing import Any

from kvmpy.migrate.pages import PAGE_SIZE
from kvmpy.migrate.stream import CHUNK_PAGES


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


SWITCH_PAGES = 64       # a dirty set this small (256 KiB) goes at the switchover whatever its trend


def worth_another_pass(left_pages: int, previous_pages: int) -> bool:
    """The dirty set fits the downtime limit: is one more pass, with the guest running, still
    worth it? Yes while each pass at least halves the set: the first pass, seconds long, leaves
    far more than a short second pass does, and a set that halves costs the switchover half as
    much. A set that stops halving (the guest's working set) or is tiny goes now; halving bounds
    the extra passes by log2 of RAM's pages."""
    return left_pages > SWITCH_PAGES and left_pages * 2 <= previous_pages


# QEMU's auto-converge parameters and defaults (qapi/migration.json)
THROTTLE_DEFAULTS = {"cpu-throttle-initial": 20, "cpu-throttle-increment": 10, "max-cpu-throttle": 99,
                     "throttle-trigger-threshold": 50}


def next_throttle(current: int, params: dict[str, Any]) -> int:
    """The vCPU throttle after the guest out-dirtied the link again: the initial percentage,
    then one increment more each time, at most max-cpu-throttle (QEMU's mig_throttle_guest_down)."""
    p = {**THROTTLE_DEFAULTS, **params}
    pct = p["cpu-throttle-initial"] if current == 0 else current + p["cpu-throttle-increment"]
    return max(0, min(int(pct), int(p["max-cpu-throttle"]), 99))


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
