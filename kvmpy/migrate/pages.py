"""Guest pages for the stream: which pages are zero (they are never sent), runs of pages, the
checksum of a RAM range, a live pass's pages gathered (gather_pages, or packed into chunks
straight from a dirty mask: pack_marked) and a received chunk's pages put in place
(scatter_pages), all in C when it is built (kvmpy/ioctl/pagecopy.c), numpy as the reference.

Zero detection is numpy over the whole range (each page viewed as 512 uint64 words, `.any()` per
row), a block of SCAN_BLOCK_BYTES at a time so the temporaries stay small: ~12 GB/s here, so a
512 MiB guest is scanned in ~40 ms; a Python loop per page would take seconds.

The range checksum is crc32 over the range's non-zero pages in address order, followed by the
bitmap of which pages are non-zero (numpy.packbits, little bit order). It is a function of the
contents alone, so the writer, a reader copying the range out of a pipe, and a verifier looking
at a mapped file all compute it the same way; it costs crc32 of the data actually sent (~2 GB/s)
rather than of all of RAM, and the bitmap makes a page that moved or turned zero a mismatch too.
"""
from __future__ import annotations

import errno
import os
import zlib
from typing import Any, Iterator, Sequence

import numpy as np

from kvmpy.errors import MigrationError

PAGE_SIZE = 4096
PAGE_SHIFT = 12
CHUNK_PAGES = 1024                 # 4 MiB of pages per MEMORY_RUNS section of a stream
ZERO_RUN = 1 << 31                  # a MEMORY_RUNS run table's count flag: these pages are zero
SCAN_BLOCK_BYTES = 64 << 20
_WORDS_PER_PAGE = PAGE_SIZE // 8


def byte_view(buffer: Any, what: str, writable: bool = False) -> np.ndarray:
    """A 1-D uint8 numpy view of `buffer` (a numpy array, memoryview, mmap, bytearray...) without
    copying; its size must be a whole number of pages."""
    try:
        view = memoryview(buffer)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        array = np.frombuffer(view, dtype=np.uint8) if view.readonly else np.asarray(view)
    except (TypeError, ValueError) as exc:
        raise MigrationError(what, detail=f"not a contiguous byte buffer ({exc})") from None
    if writable and not array.flags.writeable:
        raise MigrationError(what, detail="the buffer is read-only")
    if array.size % PAGE_SIZE:
        raise MigrationError(what, detail=f"size {array.size:#x} is not a multiple of {PAGE_SIZE}")
    return array


def nonzero_pages(view: np.ndarray, extents: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Boolean array, one entry per page of `view` (uint8, whole pages): is the page non-zero.
    With `extents` ([(byte offset, length)], see data_extents) only those bytes are looked at and
    every other page counts as zero."""
    if extents is None:
        return _scan(view)
    pages = view.size // PAGE_SIZE
    result = np.zeros(pages, dtype=bool)
    for start, length in extents:
        first, last = max(0, start // PAGE_SIZE), min(pages, -(-(start + length) // PAGE_SIZE))
        if first < last:
            result[first:last] = _scan(view[first * PAGE_SIZE:last * PAGE_SIZE])
    return result


def data_extents(fd: int, offset: int, size: int) -> list[tuple[int, int]] | None:
    """The extents [(byte offset from `offset`, length)] of a MAP_SHARED file or memfd that may
    hold data, from SEEK_DATA/SEEK_HOLE; None where the file system cannot tell.

    Why: reading a hole of a shmem mapping allocates a page (there is no shared zero page for
    shmem), so scanning all of a memfd guest's RAM for zero pages would make the host allocate
    every page the guest never touched. Holes are zero; only the extents need scanning. Not for
    MAP_PRIVATE mappings: their written pages are anonymous and invisible to the file. Moves the
    fd's file offset (unused by a mapped memfd)."""
    extents: list[tuple[int, int]] = []
    position, end = offset, offset + size
    while position < end:
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:        # no data after `position`
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return None
            raise MigrationError("finding the data in guest RAM", errno=exc.errno) from None
        if data >= end:
            break
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        extents.append((data - offset, min(hole, end) - data))
        position = hole
    return extents


PAGEMAP_PRESENT, PAGEMAP_SWAPPED = 1 << 63, 1 << 62


def populated_extents(address: int, size: int, pagemap: str = "/proc/self/pagemap") -> list[tuple[int, int]] | None:
    """The extents [(byte offset from `address`, length)] of this process's private anonymous
    mapping [address, address+size) that hold pages (present, or swapped out), from
    /proc/self/pagemap; None where it cannot be read. A page the process never touched is
    neither, and reads as zero.

    Why: a migration's first pass scans all of RAM for zero pages. Under nested TCG that scan
    was 1.9 s of a 5.1 s first pass for a 512 MiB Linux guest, most of whose RAM the guest never
    touched; this table (8 bytes a page) says which pages can hold data at all. Only for
    anonymous memory: a MAP_PRIVATE file mapping's untouched pages hold the file's data."""
    if address % PAGE_SIZE or size % PAGE_SIZE:
        return None
    pages = size // PAGE_SIZE
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = bytearray()
        want, at = pages * 8, (address // PAGE_SIZE) * 8
        while len(raw) < want:
            chunk = os.pread(fd, min(want - len(raw), 1 << 20), at + len(raw))
            if not chunk:
                return None
            raw += chunk
    except OSError:
        return None
    finally:
        os.close(fd)
    entries = np.frombuffer(raw, dtype="<u8")
    populated = (entries & np.uint64(PAGEMAP_PRESENT | PAGEMAP_SWAPPED)) != 0
    return [(first * PAGE_SIZE, count * PAGE_SIZE) for first, count in runs(populated)]


def _scan(view: np.ndarray) -> np.ndarray:
    pages = view.size // PAGE_SIZE
    result = np.empty(pages, dtype=bool)
    block_pages = SCAN_BLOCK_BYTES // PAGE_SIZE
    for first in range(0, pages, block_pages):
        last = min(pages, first + block_pages)
        block = view[first * PAGE_SIZE:last * PAGE_SIZE].view(np.uint64)
        result[first:last] = nonzero_rows(block.reshape(last - first, _WORDS_PER_PAGE))
    return result


def nonzero_rows(words: np.ndarray) -> np.ndarray:
    """Per row of a (pages, PAGE_SIZE // 8) uint64 array, one page a row: is the page non-zero.
    The first word settles most pages that hold data, so only the others are read whole (as
    QEMU's buffer_is_zero stops at the first non-zero byte). Why: the test read every byte of
    every data page a pass sends, one of the few passes over the data a send makes (gather,
    crc, the socket's copy), where the CPU is what bounds migration under nested virtualisation.
    Mostly zero-headed rows are read whole in one pass (picking them out would copy them)."""
    result = words[:, 0] != 0
    undecided = np.flatnonzero(~result)
    if undecided.size * 4 > result.size:
        return np.any(words, axis=1)
    if undecided.size:
        result[undecided] = words[undecided].any(axis=1)
    return result


def runs(mask: np.ndarray) -> Iterator[tuple[int, int]]:
    """(first index, count) of each run of True in a boolean array, in order."""
    for start, count in run_table(mask).tolist():
        yield start, count


def run_table(mask: np.ndarray, offset: int = 0) -> np.ndarray:
    """The runs of True in a boolean array as one (n, 2) int64 array of (first index + `offset`,
    count) rows, in order: what a pass hands StreamWriter.write_pages, with no Python per run
    (a guest's scattered dirty pages are thousands of runs a pass)."""
    # From the set indices, not edges over the whole mask: a switchover's mask is all of RAM
    # with a few thousand pages set, and the edge diff (in int64 after the concatenation)
    # cost ~1.7 ms here, tens of ms of the downtime in L1, against 0.1 ms.
    index = np.flatnonzero(mask)
    if not index.size:
        return np.empty((0, 2), dtype=np.int64)
    breaks = np.flatnonzero(np.diff(index) != 1)
    starts = index[np.concatenate(([0], breaks + 1))]
    ends = index[np.concatenate((breaks, [index.size - 1]))] + 1
    return np.stack([starts + offset, ends - starts], axis=1).astype(np.int64)


class RangeChecksum:
    """The range checksum (see the module docstring), fed page data in address order."""

    def __init__(self) -> None:
        self._crc = 0

    def update(self, data: Any) -> None:
        """Feed the bytes of consecutive non-zero pages."""
        self._crc = zlib.crc32(data, self._crc)

    def finish(self, nonzero: np.ndarray) -> int:
        return zlib.crc32(np.packbits(nonzero, bitorder="little").tobytes(), self._crc)


def memory_checksum(buffer: Any) -> int:
    """The range checksum of a whole RAM range (e.g. a restored, mapped range: reads all of it)."""
    view = byte_view(buffer, "checksumming guest memory")
    nonzero = nonzero_pages(view)
    checksum = RangeChecksum()
    for first, count in runs(nonzero):
        checksum.update(view[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
    return checksum.finish(nonzero)


def scatter_pages(target: np.ndarray, runs_table: np.ndarray, data: Any) -> None:
    """Put a chunk's pages in place: `data` (its data runs' pages in order) into the runs' pages
    of `target`, and zero into its zero runs. With the C extension, one kvmpy_pages_place call
    checks every run and the data's size, then places the pages (see gather_pages for why C; the
    page numbers of both kinds of run and their checks were a dozen numpy calls a chunk); numpy
    below is the reference. Runs outside `target`, or data not matching the data runs, raise
    ValueError before anything is written."""
    pages = target.reshape(-1, PAGE_SIZE)
    c = _c_pages()
    if c is not None and pages.flags.c_contiguous:
        ffi, lib = c
        table = np.ascontiguousarray(runs_table, dtype=np.int64)
        source = np.frombuffer(data, dtype=np.uint8)
        if table.ndim != 2 or table.shape[1] != 3 or source.size % PAGE_SIZE:
            raise ValueError(f"scatter: a run table of shape {table.shape} with {source.size} bytes of data")
        if lib.kvmpy_pages_place(ffi.from_buffer("uint8_t[]", pages, require_writable=True), pages.shape[0],
                                 ffi.from_buffer("int64_t[]", table), table.shape[0],
                                 ffi.from_buffer("uint8_t[]", source), source.size // PAGE_SIZE) < 0:
            raise ValueError(f"scatter: runs outside the {pages.shape[0]} pages of the range, or "
                             f"{source.size // PAGE_SIZE} pages of data for other data runs")
        return
    table = np.asarray(runs_table, dtype=np.int64).reshape(-1, 3)
    zero = table[:, 2] != 0
    data_numbers = _checked_numbers(pages, page_numbers(table[~zero, 0], table[~zero, 1]))
    zero_numbers = _checked_numbers(pages, page_numbers(table[zero, 0], table[zero, 1]))
    source = np.frombuffer(data, dtype=np.uint8)
    if source.size != data_numbers.size * PAGE_SIZE:
        raise ValueError(f"scatter: {source.size} bytes of data for {data_numbers.size} pages")
    pages[data_numbers] = source.reshape(-1, PAGE_SIZE)
    pages[zero_numbers] = 0


def gathered_chunks(view: np.ndarray, page_runs: Any, chunk_pages: int = CHUNK_PAGES,
                    scratch: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """write_pages' chunks for many scattered runs, [(first page, count)] or an (n, 2) array of
    them: for each `chunk_pages` of the runs' pages, the run table (rows of first page, count |
    ZERO_RUN: cut where pages stop being consecutive or change between zero and data) and the
    data pages, gathered by one call that also serves the zero test (pages.gather_pages) into
    `scratch` (at least `chunk_pages` rows, reused: each chunk must be written before the next is
    asked for) or, without it, a new buffer per chunk.
    Why: per page, a pass of a few hundred scattered pages was thousands of numpy calls (hundreds
    of ms under nested TCG, all of it downtime at the switchover); and the gather is the copy a
    live pass needs anyway (crc and data must agree while the guest writes), where the pages
    used to be copied twice, and a paused guest's pages went out one write per page. A reused
    buffer spares faulting in a fresh one: in L1 a fresh 4 MiB gather cost 55-60 us a page
    against 27-30 into a reused one (before the copy itself went to C)."""
    table = np.asarray(page_runs, dtype=np.int64).reshape(-1, 2)
    firsts, counts = table[:, 0], table[:, 1]
    pages = page_numbers(firsts, counts)
    rows = view.reshape(-1, PAGE_SIZE)
    for start in range(0, pages.size, chunk_pages):
        chunk = pages[start:start + chunk_pages]
        out = scratch if scratch is not None else np.empty((chunk.size, PAGE_SIZE), dtype=np.uint8)
        zero, data = gather_pages(rows, chunk, out)
        yield chunk_run_table(chunk, zero), data


def chunk_run_table(numbers: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """A chunk's run table for its pages `numbers` (in order) and their zero mask: rows of (first
    page, count | ZERO_RUN for a zero run) as '<u4', a run cut where pages stop being
    consecutive or change between zero and data."""
    cuts = np.flatnonzero((np.diff(numbers) != 1) | (np.diff(zero.view(np.int8)) != 0)) + 1
    starts = np.concatenate(([0], cuts))
    lengths = np.diff(np.concatenate((starts, [numbers.size])))
    return np.stack([numbers[starts], lengths | np.where(zero[starts], ZERO_RUN, 0)], axis=1).astype("<u4")


def pack_marked(view: np.ndarray, mask: np.ndarray, first: int, chunk_pages: int,
                scratch: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """A dirty pass's chunks straight from its mask: the pages `first + i` of `view` (a RAM
    range's bytes) whose mask[i] is set, `chunk_pages` at a time, each chunk as (its run table,
    as chunk_run_table; its data pages, gathered into `scratch` (at least `chunk_pages` rows,
    reused: write each chunk before asking for the next); their data_hash state). The same
    chunks as gathered_chunks(view, run_table(mask, first)) with data_hash over each.

    Why: per chunk, the runs, page numbers, gather, cuts, table and hash were a dozen numpy calls
    and two C calls, ~20 us a page of a live pass in L1 (nested TCG), where the pass is bounded
    by the source's CPU: kvmpy_pages_pack does them in one walk of the mask. numpy (through
    gathered_chunks) is the reference, compared in tier 0, and the path of an unbuilt checkout."""
    mask = np.ascontiguousarray(mask, dtype=bool)
    rows = view.reshape(-1, PAGE_SIZE)
    if first < 0 or first + mask.size > rows.shape[0]:
        raise ValueError(f"pack_marked: pages {first}+{mask.size} outside the range's {rows.shape[0]}")
    if chunk_pages < 1 or scratch.shape[0] < chunk_pages or scratch.shape[1:] != (PAGE_SIZE,) or \
            not scratch.flags.c_contiguous:
        raise ValueError(f"pack_marked: chunks of {chunk_pages} pages in a scratch of {scratch.shape}")
    c = _c_pages()
    if c is None or not rows.flags.c_contiguous:
        for table, data in gathered_chunks(view, run_table(mask, first), chunk_pages, scratch):
            yield table, data, data_hash(0, data) if data.size else 0
        return
    ffi, lib = c
    base = ffi.from_buffer("uint8_t[]", rows)
    marks = ffi.from_buffer("uint8_t[]", mask.view(np.uint8))
    out = ffi.from_buffer("uint8_t[]", scratch, require_writable=True)
    table = np.empty((chunk_pages, 2), dtype="<u4")
    table_ptr = ffi.from_buffer("uint32_t[]", table, require_writable=True)
    result, h = ffi.new("uint64_t[3]"), ffi.new("uint64_t *")
    at, n = 0, mask.size
    while at < n:
        h[0] = 0
        at += lib.kvmpy_pages_pack(base, marks + at, n - at, first + at, chunk_pages, ZERO_RUN, out, table_ptr,
                                   result, h)
        if result[2]:
            yield table[:result[1]], scratch[:result[0]], int(h[0])


def gather_pages(rows: np.ndarray, numbers: np.ndarray, out: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Copy the non-zero ones of pages `numbers` of `rows` (a (pages, PAGE_SIZE) uint8 array),
    in order, to the start of `out` (room for every page): (the zero mask per page, the rows of
    `out` holding the data pages). The copy is what a live pass sends, so the zero test is made
    on it, not on pages the guest may be writing.

    Why C (kvmpy_pages_gather) when it is built: numpy copies each 4 KiB row with glibc's
    memmove, which uses `rep movsb` at that size, and QEMU's TCG (the nested harness's L1) runs
    that a byte at a time: 27-30 us a page there against 4-5 for SSE2 moves, on a pass bounded by
    the CPU. numpy is the reference (compared in tier 0) and the path of an unbuilt checkout."""
    numbers = _checked_numbers(rows, numbers)
    if out.shape[0] < numbers.size or out.shape[1:] != (PAGE_SIZE,) or not out.flags.c_contiguous:
        raise ValueError(f"gather_pages: out {out.shape} cannot hold {numbers.size} pages")
    zero = np.zeros(numbers.size, dtype=bool)
    c = _c_pages()
    if c is not None and rows.flags.c_contiguous:
        ffi, lib = c
        held = lib.kvmpy_pages_gather(ffi.from_buffer("uint8_t[]", rows), ffi.from_buffer("int64_t[]", numbers),
                                      numbers.size, ffi.from_buffer("uint8_t[]", out, require_writable=True),
                                      ffi.from_buffer("uint8_t[]", zero.view(np.uint8), require_writable=True))
        return zero, out[:held]
    block = rows[numbers]
    zero[:] = ~nonzero_rows(block.view(np.uint64))
    data = block[~zero]
    out[:len(data)] = data
    return zero, out[:len(data)]


def _checked_numbers(rows: np.ndarray, numbers: Any) -> np.ndarray:
    """Page numbers as contiguous int64, each a row of `rows` (the C copies trust them)."""
    numbers = np.ascontiguousarray(numbers, dtype=np.int64)
    if rows.ndim != 2 or rows.shape[1] != PAGE_SIZE or rows.dtype != np.uint8:
        raise ValueError(f"page copies work on (pages, {PAGE_SIZE}) uint8 arrays, not {rows.shape} {rows.dtype}")
    if numbers.size and (int(numbers.min()) < 0 or int(numbers.max()) >= rows.shape[0]):
        raise ValueError(f"page numbers outside the {rows.shape[0]} pages of the range")
    return numbers


_H_P1, _H_P2, _H_P3 = 0x9E3779B185EBCA87, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_U64 = (1 << 64) - 1


def data_hash(h: int, data: Any) -> int:
    """`h` (0 to start) chained with the pages of `data` (bytes-like, whole pages, in the order
    sent): the data check of a MEMORY_RUNS chunk since stream format 2; hash_digest(h) is what
    the chunk header carries. The definition is kvmpy_pages_hash in kvmpy/ioctl/pagecopy.c (why:
    crc32 cost 14-20 us a page per side in L1, this ~3); numpy here is its reference."""
    array = np.frombuffer(data, dtype=np.uint8)
    if array.size % PAGE_SIZE:
        raise ValueError(f"data_hash takes whole pages, not {array.size} bytes")
    npages = array.size // PAGE_SIZE
    c = _c_pages()
    if c is not None:
        ffi, lib = c
        return int(lib.kvmpy_pages_hash(h, ffi.from_buffer("uint8_t[]", array), npages))
    words = array.view("<u8").reshape(npages, PAGE_SIZE // 32, 4)
    lanes = np.tile(np.array([_H_P1, _H_P2, _H_P3, _H_P1 ^ _H_P2], dtype=np.uint64), (npages, 1))
    p1 = np.uint64(_H_P1)
    with np.errstate(over="ignore"):
        for i in range(PAGE_SIZE // 32):
            lanes = (lanes ^ words[:, i, :]) * p1
    for a, b, c_, d in lanes.tolist():
        page = a ^ _rotl(b, 16) ^ _rotl(c_, 32) ^ _rotl(d, 48)
        h = ((_rotl(h, 23) ^ page) * _H_P2) & _U64
    return h


def hash_digest(h: int) -> int:
    """The u32 a chunk header carries for a data_hash state (murmur3's 64-bit finaliser, folded)."""
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _U64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _U64
    h ^= h >> 33
    return (h ^ (h >> 32)) & 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (64 - r))) & _U64


_C_PAGES: list = []


def _c_pages() -> tuple[Any, Any] | None:
    """(ffi, lib) of the C extension when it has the page copies, else None."""
    if not _C_PAGES:
        try:
            from kvmpy.ioctl._kvm import ffi, lib
            _C_PAGES.append((ffi, lib) if hasattr(lib, "kvmpy_pages_gather") else None)
        except ImportError:
            _C_PAGES.append(None)
    return _C_PAGES[0]


def page_numbers(firsts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The page numbers of runs (first pages, counts), in order, as one array."""
    offsets = np.cumsum(counts) - counts
    return np.arange(int(counts.sum()), dtype=np.int64) + np.repeat(firsts - offsets, counts)
