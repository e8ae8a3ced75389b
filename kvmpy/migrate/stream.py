"""The snapshot / migration stream: its layout, and the writer (the reader is kvmpy.migrate.reader).

One format serves a snapshot file and a stream through a pipe or socket: it is written once,
front to back, except that the file layout of guest memory (below) patches its own range table
after writing the pages. All integers are little-endian.

    header   := "KVMPYMIG" u32 format_version(=2) u32 flags(=0) u32 crc32(of the 16 bytes before)
    section  := u8 kind  3 zero bytes  u32 crc  u64 length  payload[length]
    stream   := header section* END-section

A section's crc is crc32 over (u8 kind, u64 length) then its payload, except for MEMORY_FILE,
whose crc covers its range table only, and MEMORY_RUNS, whose pages a hash checks (see there).
The reader checks lengths against fixed limits before it allocates or reads anything, and
refuses a kind it does not know. It reads format 1 too, whose only difference is MEMORY_RUNS's.

Kinds:
  CONFIG (1)   an encoded state value (kvmpy.migrate.codec): the machine's identity, checked
               against the destination before anything is built
  STATE (2)    an encoded state value: MachineState (VM, vCPUs, devices)
  MEMORY_FILE (3), for a seekable regular file: guest RAM as a sparse, page-aligned image
               payload := u32 count  u32 zero  count * (u64 gpa  u64 size  u64 offset
                          u32 checksum  u32 zero)  zero padding  range data
               Each range's data is laid out contiguously at `offset` (from the start of the
               stream, a multiple of 4096, one range after another), zero pages are holes, so a
               restore maps each range from the file (MAP_PRIVATE) and its cost does not grow with
               RAM. The section crc covers only this table: checking the pages would read all of
               RAM, the very cost the layout avoids. Each range's `checksum` (kvmpy.migrate.pages:
               crc32 of its non-zero pages and their bitmap) is checked when the range is read
               through a pipe (`exec:cat FILE`), and on demand for a mapped range
               (reader.verify_file_range).
  MEMORY_RUNS (4), for a pipe or socket: one chunk of at most CHUNK_PAGES pages of one range
               payload := u64 gpa  u32 nruns  u32 data_hash  nruns * (u32 first_page  u32 count)  data
               The section crc covers the chunk header and run table; `data_hash`
               (kvmpy.migrate.pages: hash_digest of data_hash over the data pages in order)
               covers the data. Why not the crc: in L1 crc32 cost 14-20 us a page on each side
               of a live pass, the hash ~3. Format 1: the crc covers the data, data_hash is zero.
               `count` has ZERO_RUN (bit 31) set for a run of zero pages, which carries no data
               (a later live-migration pass must clear pages that became zero; the first pass
               never sends them); the data of the other runs follows in order. A chunk covers at
               most CHUNK_PAGES pages in all, so memory use and the work a chunk asks for are
               bounded on both sides, and later passes send dirty pages the same way.
  MEMORY_ZSTD (5), the live migration's `compress` capability: one MEMORY_RUNS payload
               compressed with zstd (kvmpy.migrate.zstd); payload := u32 raw length  u32 zero
               zstd frame. The raw length is bounded like a MEMORY_RUNS payload and must be
               exactly what the frame holds; sent only where it is smaller.
  DISK (6), block migration (kvmpy.migrate.block, which encodes and checks it): a versioned
               payload := u8 version(=1)  u8 type  u16 drive|count  u32 nruns  body; type 0
               (SETUP) lists the writable drives the source copies with their sizes, type 1
               (BLOCKS) carries runs of one drive's image (byte offset, length, ZERO flag) and
               their data, at most DISK_CHUNK_BYTES in all.
  SYNC (7)     live migration only, where the destination's ACCEPT offered it ("sync"):
               payload := u64 sequence number; the destination answers SYNCED once it has
               applied everything before it. The source sends one after each pass, so the
               switchover starts with the destination caught up (see kvmpy.migrate.precopy).
  END (0xFF)   payload := u64 number of sections before it: truncation, even at a section
               boundary, is detected.
"""
from __future__ import annotations

import enum
import io
import os
import stat
import struct
import zlib
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import numpy as np

from kvmpy.errors import MigrationError
from kvmpy.migrate.codec import MAX_STATE_BYTES
from kvmpy.migrate.pages import (CHUNK_PAGES, PAGE_SIZE, ZERO_RUN, RangeChecksum, byte_view, data_hash,
                                 gathered_chunks, hash_digest, nonzero_pages, pack_marked, runs)

MAGIC = b"KVMPYMIG"
FORMAT_VERSION = 2                              # what the writer writes
READ_FORMATS = (1, 2)                           # what the reader reads (1: MEMORY_RUNS crc over the data)
FILE_HEADER = struct.Struct("<8sII")            # magic, format version, flags
FILE_HEADER_CRC = struct.Struct("<I")
SECTION_HEADER = struct.Struct("<B3sIQ")        # kind, reserved, crc32, payload length
SECTION_CRC_FIELDS = struct.Struct("<BQ")       # what the crc covers of the header: kind, length
CHUNK_HEADER = struct.Struct("<QII")            # gpa, run count, data hash (format 1: zero)
RUN_ENTRY_SIZE = 8                              # u32 first page, u32 count | ZERO_RUN
RANGE_TABLE = struct.Struct("<II")              # range count, reserved
RANGE_ENTRY = struct.Struct("<QQQII")           # gpa, size, data offset, checksum, reserved
END_PAYLOAD = struct.Struct("<Q")               # sections before END
ZSTD_HEADER = struct.Struct("<II")              # raw (decompressed) length, reserved
SYNC_PAYLOAD = struct.Struct("<Q")              # sequence number
SMALL_PART_BYTES = 1 << 20                      # a section's first part written with its header
FEW_RUNS = 8                                    # write_pages tests more runs than this in one go

MAX_RANGES = 256                                # RAM ranges in one MEMORY_FILE table
MAX_GPA = 1 << 52                               # x86's widest physical address
MAX_CHUNK_PAYLOAD = CHUNK_HEADER.size + CHUNK_PAGES * (RUN_ENTRY_SIZE + PAGE_SIZE)
# ZSTD_COMPRESSBOUND of a chunk (s + s/256 + a little), with room to spare
MAX_ZSTD_PAYLOAD = ZSTD_HEADER.size + MAX_CHUNK_PAYLOAD + (MAX_CHUNK_PAYLOAD >> 7) + 4096
DISK_CHUNK_BYTES = 4 << 20                      # image bytes one DISK section covers at most
MAX_DISK_RUNS = 256                             # runs (or drives) in one DISK section
DISK_HEADER = struct.Struct("<BBHI")            # version, type, drive (or count), runs (or 0)
DISK_RUN = struct.Struct("<QII")                # offset, length, flags | SETUP: bytes, drive, block size
MAX_DISK_PAYLOAD = DISK_HEADER.size + MAX_DISK_RUNS * DISK_RUN.size + DISK_CHUNK_BYTES

T = TypeVar("T")


class SectionKind(enum.IntEnum):
    CONFIG = 1
    STATE = 2
    MEMORY_FILE = 3
    MEMORY_RUNS = 4
    MEMORY_ZSTD = 5
    DISK = 6
    SYNC = 7
    END = 0xFF


def section_crc(kind: int, length: int, parts: Iterable[Any]) -> int:
    """The crc a section header carries: over (kind, length), then each part's bytes."""
    crc = zlib.crc32(SECTION_CRC_FIELDS.pack(kind, length))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def is_seekable_regular(fileobj: Any) -> bool:
    """True when `fileobj` is a seekable regular file: the writer then lays guest memory out as a
    sparse image the reader can map; anything else (a pipe, a socket) gets the run encoding."""
    try:
        fd = fileobj.fileno()
        return stat.S_ISREG(os.fstat(fd).st_mode) and bool(fileobj.seekable())
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return False


def check_ranges(ranges: Sequence[tuple[int, Any]], what: str,
                 writable: bool = False) -> list[tuple[int, np.ndarray]]:
    """Guest RAM ranges as (gpa, uint8 view): page-aligned, whole pages, not overlapping."""
    if len(ranges) > MAX_RANGES:
        raise MigrationError(what, detail=f"{len(ranges)} RAM ranges (at most {MAX_RANGES})")
    views = [(gpa, byte_view(buffer, f"{what}: range at {gpa:#x}", writable)) for gpa, buffer in ranges]
    previous_end = 0
    for gpa, view in sorted(views, key=lambda item: item[0]):
        if gpa % PAGE_SIZE or gpa < previous_end or gpa + view.size > MAX_GPA:
            raise MigrationError(what, detail=f"RAM range {gpa:#x}+{view.size:#x} is unaligned, "
                                              "overlaps another or lies beyond 2**52")
        previous_end = gpa + view.size
    return views


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    """pwrite until all of `data` is written (one system call per run of pages, no seek)."""
    while data:
        written = os.pwrite(fd, data, offset)
        data = data[written:]
        offset += written


class StreamWriter:
    """Writes one stream front to back: write_header(), the sections, finish().

    With `sparse` None the layout of guest memory follows the file object (is_seekable_regular);
    True forces the file layout (refused on anything else), False the run layout. I/O failures
    (a full disk, a reader that went away) raise MigrationError with their errno: the caller
    (kvmpy.migrate.uri) turns an exec: command's death into its exit status.
    """

    def __init__(self, fileobj: BinaryIO, sparse: bool | None = None):
        self._file = fileobj
        regular = is_seekable_regular(fileobj)
        if sparse and not regular:
            raise MigrationError("writing the migration stream",
                                 detail="the file layout of guest memory needs a seekable regular file")
        self.sparse = regular if sparse is None else sparse
        self._base = self._io(fileobj.tell) if self.sparse else 0
        if self._base % PAGE_SIZE:
            raise MigrationError("writing the migration stream",
                                 detail=f"a file layout must start on a page boundary, not at {self._base}")
        self._sections = 0
        self._started = False
        self._finished = False
        self._memory_file_written = False
        # Live migration sends pages the guest may be writing: each chunk's pages are copied
        # before its crc is computed, so crc and data agree (a torn page is sent again later,
        # since it is dirty). A paused guest's pages need no copy.
        self.copy_pages = False
        self.compress = False           # MEMORY_ZSTD for chunks zstd makes smaller (live only)
        # Pages per MEMORY_RUNS chunk (at most CHUNK_PAGES). A switchover sends smaller ones: the
        # destination checks and places a chunk while the source builds the next, so only the
        # last chunk's work is added to the downtime, not a whole 4 MiB chunk's (~30 ms in L1).
        self.chunk_pages = CHUNK_PAGES
        self._gather: np.ndarray | None = None     # gathered_chunks' scratch, kept across passes
        self.bytes_written = 0          # stream bytes, holes of the file layout included
        self.page_bytes_written = 0     # guest page data actually written

    def _io(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return call(*args)
        except OSError as exc:
            raise MigrationError("writing the migration stream", errno=exc.errno) from exc

    def _write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:                         # a raw (unbuffered) file may take part of it
            written = self._io(self._file.write, view)
            if written is None:
                raise MigrationError("writing the migration stream", detail="the target would block")
            view = view[written:]
        self.bytes_written += memoryview(data).nbytes

    def _check_open(self) -> None:
        if not self._started or self._finished:
            raise MigrationError("writing the migration stream",
                                 detail="sections go after write_header() and before finish()")

    def write_header(self) -> None:
        if self._started:
            raise MigrationError("writing the migration stream", detail="header written twice")
        header = FILE_HEADER.pack(MAGIC, FORMAT_VERSION, 0)
        self._write(header + FILE_HEADER_CRC.pack(zlib.crc32(header)))
        self._started = True

    def _write_section(self, kind: SectionKind, parts: Sequence[Any], crc_parts: int | None = None) -> None:
        """`crc_parts`: how many leading parts the crc covers (MEMORY_RUNS: the table), all by default."""
        length = sum(memoryview(part).nbytes for part in parts)
        header = SECTION_HEADER.pack(kind, b"\0\0\0", section_crc(kind, length, parts[:crc_parts]), length)
        if parts and memoryview(parts[0]).nbytes <= SMALL_PART_BYTES:
            # one write for the header and a small first part (a chunk's run table, STATE, END,
            # SYNC): on a TCP_NODELAY socket each write may be a packet of its own
            header += bytes(parts[0])
            parts = parts[1:]
        self._write(header)
        for part in parts:
            self._write(part)
        self._sections += 1

    def write_section(self, kind: SectionKind, payload: bytes) -> None:
        """A CONFIG or STATE section carrying an encoded state value."""
        self._check_open()
        if kind not in (SectionKind.CONFIG, SectionKind.STATE):
            raise MigrationError("writing the migration stream",
                                 detail=f"write_section takes CONFIG or STATE, not {kind!r}")
        if len(payload) > MAX_STATE_BYTES:
            raise MigrationError("writing the migration stream",
                                 detail=f"{kind.name} of {len(payload)} bytes exceeds {MAX_STATE_BYTES}")
        self._write_section(kind, [payload])

    def write_disk(self, parts: Sequence[Any]) -> None:
        """A DISK section (kvmpy.migrate.block built its payload, `parts` joined in order)."""
        self._check_open()
        length = sum(memoryview(part).nbytes for part in parts)
        if length > MAX_DISK_PAYLOAD:
            raise MigrationError("writing the migration stream",
                                 detail=f"DISK section of {length} bytes exceeds {MAX_DISK_PAYLOAD}")
        self._write_section(SectionKind.DISK, parts)

    def write_sync(self, sequence: int) -> None:
        """A SYNC marker (live migration): the destination answers once it applied all before it."""
        self._check_open()
        self._write_section(SectionKind.SYNC, [SYNC_PAYLOAD.pack(sequence)])

    def write_memory(self, ranges: Sequence[tuple[int, Any]],
                     extents: Mapping[int, Sequence[tuple[int, int]] | None] | None = None) -> None:
        """All of guest RAM, [(gpa, buffer)], zero pages left out: one MEMORY_FILE section in the
        file layout, MEMORY_RUNS chunks otherwise. The guest must not run meanwhile. `extents`
        {gpa: [(byte offset, length)]} limits the zero-page scan of a range to where it may hold
        data (pages.data_extents for a memfd: scanning its holes would allocate them)."""
        self._check_open()
        views = check_ranges(ranges, "writing guest memory")
        extents = extents or {}
        nonzero = [nonzero_pages(view, extents.get(gpa)) for gpa, view in views]
        if not self.sparse:
            for (gpa, view), mask in zip(views, nonzero):
                self._write_chunks(gpa, view, ((first, count, False) for first, count in runs(mask)))
            return
        if self._memory_file_written:
            raise MigrationError("writing guest memory", detail="the file layout holds one memory section")
        self._write_memory_file(views, nonzero)
        self._memory_file_written = True

    def write_pages(self, gpa: int, buffer: Any, page_runs: Iterable[tuple[int, int]] | np.ndarray,
                    nonzero: bool = False) -> None:
        """Some pages of one range, [(first page, count)] or such an (n, 2) array (pages.run_table:
        no Python per run), as MEMORY_RUNS chunks, pages that are zero now sent as zero runs: what
        a later live-migration pass sends for dirty pages. `nonzero`: the caller just found these
        pages non-zero (the first pass's scan), so a few runs of a paused guest go as data without
        a second scan (one that turned zero since is sent as data: harmless); many runs, and any
        pages copied while the guest runs, are gathered and tested as the gather copies them
        (pages.gather_pages)."""
        view = self._run_view(gpa, buffer)
        pages = view.size // PAGE_SIZE
        table = np.asarray(page_runs if isinstance(page_runs, np.ndarray) else list(page_runs),
                           dtype=np.int64).reshape(-1, 2)
        bad = np.flatnonzero((table[:, 0] < 0) | (table[:, 1] < 1) | (table[:, 0] + table[:, 1] > pages))
        if bad.size:
            first, count = table[bad[0]].tolist()
            raise MigrationError("writing guest memory", detail=f"pages {first}+{count} outside the range's {pages}")
        # Many runs, or pages a running guest may write (they are copied anyway): one gather,
        # whose zero test rides on the copy (scanned or not), against a scan and a join per run.
        if len(table) > FEW_RUNS or self.copy_pages:
            for chunk_table, data in gathered_chunks(view, table, self.chunk_pages, self._scratch()):
                self._write_chunk(gpa, chunk_table, [memoryview(data.reshape(-1))] if data.size else [], copied=True)
            return
        if nonzero:
            items = [(first, count, False) for first, count in table.tolist()]
        else:
            items = []
            for first, count in table.tolist():
                mask = nonzero_pages(view[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
                marks = [(first + start, n, False) for start, n in runs(mask)]
                marks += [(first + start, n, True) for start, n in runs(~mask)]
                items += sorted(marks)
        self._write_chunks(gpa, view, items)

    def write_marked(self, gpa: int, buffer: Any, mask: np.ndarray, first: int) -> None:
        """The pages `first + i` of one range whose mask[i] is set, as write_pages sends them
        for a running guest (gathered, each copy tested for zero and hashed): a dirty pass's
        pages straight from the tracker's mask, one C call a chunk (pages.pack_marked)."""
        view = self._run_view(gpa, buffer)
        if first < 0 or first + len(mask) > view.size // PAGE_SIZE:
            raise MigrationError("writing guest memory", detail=f"pages {first}+{len(mask)} outside the range's "
                                                                 f"{view.size // PAGE_SIZE}")
        for table, data, h in pack_marked(view, mask, first, self.chunk_pages, self._scratch()):
            self._write_chunk(gpa, table, [memoryview(data.reshape(-1))] if data.size else [], copied=True, h=h)

    def _run_view(self, gpa: int, buffer: Any) -> np.ndarray:
        """A RAM range's bytes for write_pages/write_marked, checked: the run layout, a range whose
        page numbers fit a run table's entries."""
        self._check_open()
        if self.sparse:
            raise MigrationError("writing guest memory", detail="pages by run table need the run layout")
        [(gpa, view)] = check_ranges([(gpa, buffer)], "writing guest memory")
        if view.size // PAGE_SIZE >= ZERO_RUN:
            raise MigrationError("writing guest memory", detail=f"range at {gpa:#x} is too large")
        return view

    def _scratch(self) -> np.ndarray:
        """The gather buffer, kept across passes (a fresh one per chunk faults in 4 MiB each time)."""
        if self._gather is None or self._gather.shape[0] < self.chunk_pages:
            self._gather = np.empty((max(self.chunk_pages, CHUNK_PAGES), PAGE_SIZE), dtype=np.uint8)
        return self._gather

    def _write_chunks(self, gpa: int, view: np.ndarray, items: Iterable[tuple[int, int, bool]]) -> None:
        if view.size // PAGE_SIZE >= ZERO_RUN:
            raise MigrationError("writing guest memory", detail=f"range at {gpa:#x} is too large")
        entries: list[tuple[int, int]] = []
        data: list[memoryview] = []
        covered = 0
        chunk_pages = self.chunk_pages
        for first, count, zero in items:
            while count:
                take = min(count, chunk_pages - covered)
                entries.append((first, take | (ZERO_RUN if zero else 0)))
                if not zero:
                    data.append(memoryview(view[first * PAGE_SIZE:(first + take) * PAGE_SIZE]))
                covered += take
                first += take
                count -= take
                if covered == chunk_pages:
                    self._write_chunk(gpa, entries, data)
                    entries, data, covered = [], [], 0
        if entries:
            self._write_chunk(gpa, entries, data)

    def _write_chunk(self, gpa: int, entries: Any, data: list[memoryview], copied: bool = False,
                     h: int | None = None) -> None:
        """One MEMORY_RUNS (or MEMORY_ZSTD) chunk: `entries` [(first, count | ZERO_RUN)] or such
        rows, `data` the data runs' pages in order (`copied`: a private copy already; `h`: their
        data_hash state, when the copy computed it)."""
        if self.copy_pages and data and not copied:
            data = [memoryview(b"".join(data))]
        if h is None:
            h = 0
            for part in data:
                h = data_hash(h, part)
        table = CHUNK_HEADER.pack(gpa, len(entries), hash_digest(h)) + np.asarray(entries, dtype="<u4").tobytes()
        page_bytes = sum(part.nbytes for part in data)
        if self.compress:
            from kvmpy.migrate import zstd
            raw = table + b"".join(data)
            frame = zstd.compress(raw)
            if len(frame) + ZSTD_HEADER.size < len(raw):
                self._write_section(SectionKind.MEMORY_ZSTD, [ZSTD_HEADER.pack(len(raw), 0), frame])
                self.page_bytes_written += page_bytes
                return
        self._write_section(SectionKind.MEMORY_RUNS, [table, *data], crc_parts=1)
        self.page_bytes_written += page_bytes

    def _write_memory_file(self, views: list[tuple[int, np.ndarray]], masks: list[np.ndarray]) -> None:
        f = self._file
        start = self._io(f.tell)
        payload_start = start + SECTION_HEADER.size
        table_size = RANGE_TABLE.size + len(views) * RANGE_ENTRY.size
        offset = -(-(payload_start + table_size) // PAGE_SIZE) * PAGE_SIZE
        self._io(f.truncate, start)        # flushes; nothing stale may show through the holes
        fd = self._io(f.fileno)
        entries = []
        for (gpa, view), nonzero in zip(views, masks):
            checksum = RangeChecksum()
            for first, count in runs(nonzero):
                pages = memoryview(view[first * PAGE_SIZE:(first + count) * PAGE_SIZE])
                self._io(_pwrite_all, fd, pages, offset + first * PAGE_SIZE)
                checksum.update(pages)
                self.page_bytes_written += pages.nbytes
            entries.append(RANGE_ENTRY.pack(gpa, view.size, offset - self._base, checksum.finish(nonzero), 0))
            offset += view.size
        end = offset
        self._io(f.truncate, end)          # a trailing hole still counts: the END section follows
        table = RANGE_TABLE.pack(len(views), 0) + b"".join(entries)
        length = end - payload_start
        crc = section_crc(SectionKind.MEMORY_FILE, length, [table])
        header = SECTION_HEADER.pack(SectionKind.MEMORY_FILE, b"\0\0\0", crc, length)
        self._io(_pwrite_all, fd, memoryview(header + table), start)
        self._io(f.seek, end)
        self.bytes_written += end - start
        self._sections += 1

    def finish(self) -> None:
        """The END section, then flush: a stream without it reads as truncated."""
        self._check_open()
        self._write_section(SectionKind.END, [END_PAYLOAD.pack(self._sections)])
        self._io(self._file.flush)
        self._finished = True
