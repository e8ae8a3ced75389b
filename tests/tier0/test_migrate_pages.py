"""Guest pages for the stream: zero-page detection against a per-page reference, page runs, the
range checksum's sensitivity, and memfd data extents that spare the host from allocating holes."""
from __future__ import annotations

import io
import mmap
import os
import tempfile

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.errors import MigrationError
from kvmpy.migrate import pages
from kvmpy.migrate.pages import PAGE_SIZE, byte_view, data_extents, memory_checksum, nonzero_pages, runs
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import StreamWriter


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 39), st.integers(0, PAGE_SIZE - 1), st.integers(1, 255)),
                max_size=12))
def test_nonzero_pages_and_runs_match_a_per_page_reference(writes):
    ram = np.zeros(40 * PAGE_SIZE, np.uint8)
    for page, offset, value in writes:
        ram[page * PAGE_SIZE + offset] = value
    expected = [bool(ram[p * PAGE_SIZE:(p + 1) * PAGE_SIZE].any()) for p in range(40)]
    mask = nonzero_pages(ram)
    assert mask.tolist() == expected
    rebuilt = [False] * 40
    for first, count in runs(mask):
        assert count >= 1 and not any(rebuilt[first:first + count])
        rebuilt[first:first + count] = [True] * count
    assert rebuilt == expected


def test_scan_blocks_join_up(monkeypatch):
    monkeypatch.setattr(pages, "SCAN_BLOCK_BYTES", 3 * PAGE_SIZE)
    ram = np.zeros(10 * PAGE_SIZE, np.uint8)
    ram[2 * PAGE_SIZE:6 * PAGE_SIZE] = 1                    # a run across two scan blocks
    assert list(runs(nonzero_pages(ram))) == [(2, 4)]
    assert list(runs(nonzero_pages(ram, extents=[(PAGE_SIZE * 5, 10)]))) == [(5, 1)]


def test_checksum_sees_moved_and_flipped_pages():
    ram = np.zeros(8 * PAGE_SIZE, np.uint8)
    ram[PAGE_SIZE:2 * PAGE_SIZE] = 9
    moved = np.roll(ram, PAGE_SIZE)                         # same non-zero bytes, another page
    flipped = ram.copy()
    flipped[5] = 1
    checksums = {memory_checksum(ram), memory_checksum(moved), memory_checksum(flipped),
                 memory_checksum(np.zeros_like(ram))}
    assert len(checksums) == 4


def test_byte_view_refusals():
    with pytest.raises(MigrationError, match="multiple of 4096"):
        byte_view(np.zeros(100, np.uint8), "t")
    with pytest.raises(MigrationError, match="read-only"):
        byte_view(bytes(PAGE_SIZE), "t", writable=True)
    with pytest.raises(MigrationError, match="contiguous"):
        byte_view(np.zeros((2, 2 * PAGE_SIZE), np.uint8)[:, :PAGE_SIZE], "t")
    assert byte_view(np.zeros(PAGE_SIZE // 8, np.uint64), "t").size == PAGE_SIZE


def test_memfd_extents_skip_holes_without_allocating_them():
    """Reading a shmem hole allocates it: the scan of a memfd guest looks only at its data."""
    size = 16 << 20
    fd = os.memfd_create("kvmpy-test-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size, mmap.MAP_SHARED) as mapping:
            ram = np.frombuffer(mapping, np.uint8)
            ram[10 * PAGE_SIZE] = 1
            ram[3000 * PAGE_SIZE + 7] = 2
            extents = data_extents(fd, 0, size)
            assert extents is not None and sum(n for _, n in extents) < 1 << 20
            upper = data_extents(fd, 8 << 20, 8 << 20)
            assert upper == [(start - (8 << 20), n) for start, n in extents if start >= 8 << 20]
            allocated = os.fstat(fd).st_blocks
            out = io.BytesIO()
            writer = StreamWriter(out)
            writer.write_header()
            writer.write_memory([(0, ram)], extents={0: extents})
            writer.finish()
            assert os.fstat(fd).st_blocks == allocated and writer.page_bytes_written == 2 * PAGE_SIZE
            restored = np.zeros_like(ram)
            reader = StreamReader(io.BytesIO(out.getvalue()))
            for section in reader:
                reader.read_memory_into(section, [(0, restored)])
            assert np.array_equal(restored, ram)
            del ram
    finally:
        os.close(fd)


@settings(max_examples=40, deadline=None)
@given(st.sets(st.integers(0, 63), max_size=64), st.sets(st.integers(0, 2), max_size=3), st.booleans())
def test_random_pages_round_trip_in_both_layouts(low_pages, high_pages, file_layout):
    ranges = []
    for gpa, count, chosen in ((0, 64, low_pages), (1 << 32, 3, high_pages)):
        ram = np.zeros(count * PAGE_SIZE, np.uint8)
        for page in chosen:
            ram[page * PAGE_SIZE + page % PAGE_SIZE] = page + 1
        ranges.append((gpa, ram))
    with tempfile.TemporaryFile() if file_layout else io.BytesIO() as f:
        writer = StreamWriter(f)
        assert writer.sparse == file_layout
        writer.write_header()
        writer.write_memory(ranges)
        writer.finish()
        assert writer.page_bytes_written == (len(low_pages) + len(high_pages)) * PAGE_SIZE
        f.seek(0)
        targets = [(gpa, np.zeros_like(ram)) for gpa, ram in ranges]
        reader = StreamReader(f)
        for section in reader:
            reader.read_memory_into(section, targets)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(ranges, targets))


def test_populated_extents_are_the_pages_anonymous_memory_has():
    """A first pass scans only what an anonymous guest RAM holds: pages never touched are zero."""
    size = 64 * PAGE_SIZE
    mapping = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_NOHUGEPAGE)       # one page per touch, not a 2 MiB fault
    ram = np.frombuffer(mapping, np.uint8)
    address = ram.ctypes.data
    assert pages.populated_extents(address, size) == []
    ram[3 * PAGE_SIZE + 5] = 1
    ram[10 * PAGE_SIZE:13 * PAGE_SIZE] = 7
    extents = pages.populated_extents(address, size)
    assert extents == [(3 * PAGE_SIZE, PAGE_SIZE), (10 * PAGE_SIZE, 3 * PAGE_SIZE)]
    mask = nonzero_pages(ram, extents)
    assert list(np.flatnonzero(mask)) == [3, 10, 11, 12] and (mask == nonzero_pages(ram)).all()
    assert pages.populated_extents(address + 1, size) is None            # not page-aligned
    assert pages.populated_extents(address, size, pagemap="/nonexistent") is None
    del ram                                     # the mapping closes with its last view
