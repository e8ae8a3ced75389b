"""What a pass costs near the switchover: in L1 a pass of 214 scattered pages of an idle 512 MiB
guest took 680 ms (a take, a KVM_CLEAR_DIRTY_LOG and a dozen numpy calls per chunk and per page),
and 'bytes over pass time' then called the link 1.3 MB/s, so the guest never switched over.
A small dirty set is now taken a range at a time and classified in one go; the bandwidth is
measured over windows of at least BANDWIDTH_WINDOW_BYTES."""
from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from kvmpy.migrate.pages import nonzero_pages, runs
from kvmpy.migrate.converge import BANDWIDTH_WINDOW_BYTES, BandwidthMeter, dirty_windows, runqueue_wait_s
from kvmpy.migrate.stream import CHUNK_PAGES, ZERO_RUN, gathered_chunks

PAGE = 4096


def per_run(view: np.ndarray, page_runs):
    """write_pages' classic per-run classification, the reference."""
    items = []
    for first, count in page_runs:
        mask = nonzero_pages(view[first * PAGE:(first + count) * PAGE])
        marks = [(first + s, n, False) for s, n in runs(mask)] + [(first + s, n, True) for s, n in runs(~mask)]
        items += sorted(marks)
    return items


def merged(items):
    """Adjacent items of the same kind joined (the classic splits at run borders, the vectorised
    only where pages stop being consecutive): the same pages, the same data, the same zeros."""
    out = []
    for first, count, zero in items:
        if out and out[-1][0] + out[-1][1] == first and out[-1][2] == zero:
            out[-1] = (out[-1][0], out[-1][1] + count, zero)
        else:
            out.append((first, count, zero))
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=64, max_size=64), st.data())
def test_scattered_classification_equals_the_per_run_one(data_pages, draw):
    view = np.zeros(64 * PAGE, dtype=np.uint8)
    for page, has_data in enumerate(data_pages):
        if has_data:
            view[page * PAGE + draw.draw(st.integers(0, PAGE - 1))] = 1    # one byte anywhere
    chosen = draw.draw(st.lists(st.booleans(), min_size=64, max_size=64))
    page_runs = list(runs(np.array(chosen, dtype=bool)))
    if not page_runs:
        return
    items, data = [], []
    for table, pages in gathered_chunks(view, page_runs):
        items += [(int(first), int(count) & ~ZERO_RUN, bool(count & ZERO_RUN)) for first, count in table]
        data.append(pages.reshape(-1))
    assert merged(items) == merged(per_run(view, page_runs))
    expected = [view[first * PAGE:(first + count) * PAGE] for first, count, zero in items if not zero]
    assert np.array_equal(np.concatenate(data), np.concatenate(expected or [np.zeros(0, np.uint8)]))


def test_gathered_chunks_hold_at_most_a_chunk_of_pages():
    view = np.ones(3000 * PAGE, dtype=np.uint8)
    view[4 * PAGE:5 * PAGE] = 0
    page_runs = [(p, 1) for p in range(0, 3000, 2)]            # 1500 scattered pages, page 4 zero
    chunks = list(gathered_chunks(view, page_runs))
    assert [sum(int(c) & ~ZERO_RUN for _, c in table) for table, _ in chunks] == [1024, 476]
    assert [(int(f), int(c)) for f, c in chunks[0][0][:4]] == [(0, 1), (2, 1), (4, 1 | ZERO_RUN), (6, 1)]
    assert sum(pages.shape[0] for _, pages in chunks) == 1499
    assert not any(np.shares_memory(pages, view) for _, pages in chunks), "the pages are a copy"


def test_small_passes_do_not_redefine_the_bandwidth_once_a_window_was_measured():
    e = BandwidthMeter()
    e.measure(80 << 20, 8.0)                    # the first pass: 80 MiB in 8 s
    assert e.bandwidth == (80 << 20) / 8.0
    for _ in range(5):                          # 214 pages in 0.68 s each: latency, not bandwidth
        e.measure(214 * PAGE, 0.68)
        assert e.bandwidth == (80 << 20) / 8.0
    e.measure(BANDWIDTH_WINDOW_BYTES, 1.0)      # a window's worth: measured over all of it
    assert e.bandwidth == (5 * 214 * PAGE + BANDWIDTH_WINDOW_BYTES) / (5 * 0.68 + 1.0)
    assert e.switch_bandwidth == e.bandwidth    # no wait for a CPU reported
    assert e._bytes == 0 and e._seconds == 0.0


def test_until_a_window_fills_the_bandwidth_is_everything_so_far():
    """A small guest's first pass (1 MiB into a socket buffer at once) must not stand for the link."""
    e = BandwidthMeter()
    e.measure(1 << 20, 0.001)
    assert e.bandwidth == (1 << 20) / 0.001
    e.measure(2 << 20, 0.5)
    assert e.bandwidth == (3 << 20) / 0.501


def test_the_switchover_rate_leaves_out_the_waits_for_a_cpu_at_most_half():
    """The guest's vCPUs took the CPU during the passes; at the switchover they are stopped."""
    e = BandwidthMeter()
    e.measure(16 << 20, 2.0, waited=0.5)
    assert e.bandwidth == (16 << 20) / 2.0 and e.switch_bandwidth == (16 << 20) / 1.5
    f = BandwidthMeter()
    f.measure(16 << 20, 2.0, waited=1.9)        # never more optimistic than twice the measured rate
    assert f.switch_bandwidth == 2 * f.bandwidth
    g = BandwidthMeter()
    g.measure(16 << 20, 2.0, waited=-3.0)       # a counter that went backwards counts as no wait
    assert g.switch_bandwidth == g.bandwidth


def test_runqueue_wait_reads_the_second_schedstat_field(tmp_path):
    stat = tmp_path / "schedstat"
    stat.write_text("123456789 2500000000 42\n")
    assert runqueue_wait_s(str(stat)) == 2.5
    stat.write_text("garbage\n")
    assert runqueue_wait_s(str(stat)) is None
    assert runqueue_wait_s(str(tmp_path / "missing")) is None


class CountingTracker:
    """dirty_counts over a plain dirty mask, as DirtyTracker answers it."""

    def __init__(self, dirty: np.ndarray):
        self.dirty = dirty

    def dirty_counts(self, index: int, chunk_pages: int) -> np.ndarray:
        chunks = -(-self.dirty.size // chunk_pages)
        padded = np.zeros(chunks * chunk_pages, dtype=bool)
        padded[:self.dirty.size] = self.dirty
        return padded.reshape(chunks, chunk_pages).sum(axis=1)


@settings(max_examples=150, deadline=None)
@given(npages=st.integers(1, 40 * CHUNK_PAGES), density=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_dirty_windows_cover_every_dirty_page_in_few_takes(npages, density, seed):
    """A large pass takes windows of chunks holding about a chunk of dirty pages each (a guest
    rewriting 32 MiB of a 512 MiB one: ~8 takes, not ~128), never a clean chunk at either end."""
    dirty = np.random.default_rng(seed).random(npages) < density * density
    windows = dirty_windows(CountingTracker(dirty), 0, npages)
    covered = np.zeros(-(-npages // CHUNK_PAGES) * CHUNK_PAGES, dtype=bool)
    for first, count in windows:
        assert first % CHUNK_PAGES == 0 and count % CHUNK_PAGES == 0 and count > 0
        assert not covered[first:first + count].any(), "windows overlap"
        covered[first:first + count] = True
        held = dirty[first:first + count]
        assert held[:CHUNK_PAGES].any() and held[-CHUNK_PAGES:].any(), "a clean chunk at a window's end"
        # only a window's last chunk may take it past a chunk's worth of dirty pages
        assert int(held[:max(count - CHUNK_PAGES, 0)].sum()) < CHUNK_PAGES
    assert covered[:npages][dirty].all(), "a dirty page outside every window"
    # a window ends where a run of dirty chunks ends or once it holds a chunk's worth: no more
    chunk_dirty = CountingTracker(dirty).dirty_counts(0, CHUNK_PAGES) > 0
    chunk_runs = sum(1 for _ in runs(chunk_dirty))
    assert len(windows) <= chunk_runs + int(dirty.sum()) // CHUNK_PAGES


def test_a_32_mib_hot_set_spread_over_512_mib_takes_a_handful_of_windows():
    npages = (512 << 20) // PAGE
    dirty = np.zeros(npages, dtype=bool)
    dirty[np.random.default_rng(7).choice(npages, 8192, replace=False)] = True
    windows = dirty_windows(CountingTracker(dirty), 0, npages)
    assert len(windows) <= 9, len(windows)          # was a take per chunk: 128


def test_a_tracker_without_counts_takes_chunk_by_chunk():
    class Old:
        def dirty_chunks(self, index, chunk_pages):
            return [0, 5 * chunk_pages]
    assert dirty_windows(Old(), 0, 10 * CHUNK_PAGES) == [(0, CHUNK_PAGES), (5 * CHUNK_PAGES, CHUNK_PAGES)]
