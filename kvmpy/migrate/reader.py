"""Reading a snapshot / migration stream (the layout is in kvmpy.migrate.stream).

The stream is untrusted: every length is checked against a fixed limit (and, for a file, against
the file's size) before anything is allocated or read, every section's crc before its content is
used, every page index against the destination's RAM range. Failures are MigrationError with the
stream offset; a short read at the end of a file ends in "truncated", never a wait.

    reader = StreamReader(fileobj)                  # checks the header
    for section in reader:                          # stops after END; truncation raises
        if section.kind is SectionKind.CONFIG: ...decode_state(section.payload)...
        elif section.kind is SectionKind.MEMORY_FILE and reader.mappable:
            check_file_ranges(section.file_ranges, [(gpa, size), ...])   # before mapping
            ...map_file_range(fileobj, r) for r in section.file_ranges...
        elif section.kind in (SectionKind.MEMORY_FILE, SectionKind.MEMORY_RUNS):
            reader.read_memory_into(section, ram_ranges)    # before the next section

Pages a stream does not carry are left as they are in the caller's buffers: fresh guest RAM is
zero, and zero pages are never sent except as a later pass's zero runs.

A MEMORY_RUNS chunk's run table is checked (against the section's length, then the RAM range)
before its pages are read. A chunk of long runs (a first pass) then goes straight into guest RAM
(readinto each run's slice, the data check over it, checked after the last page: data_hash since
format 2, the section crc in format 1): through scratch every byte was copied once more, and in
L1 the destination's CPU is what a busy guest's pre-copy waits on. Such a chunk failing its check
has written RAM the destination never runs (the load fails), as a good chunk before a bad one
always did. A chunk of scattered pages (a dirty pass) is read whole into scratch (a readinto per
page is a system call per page), checked, and put in place by one scatter (pages.scatter_pages).
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np

from kvmpy.errors import MigrationError
from kvmpy.migrate.codec import MAX_STATE_BYTES
from kvmpy.migrate.filemap import FileRange, check_file_ranges, map_file_range, verify_file_range  # noqa: F401
from kvmpy.migrate.pages import PAGE_SIZE, RangeChecksum, data_hash, hash_digest, nonzero_pages, runs, scatter_pages
from kvmpy.migrate.stream import (
    CHUNK_HEADER, CHUNK_PAGES, END_PAYLOAD, MAX_DISK_PAYLOAD, FILE_HEADER, FILE_HEADER_CRC, FORMAT_VERSION, MAGIC,
    MAX_CHUNK_PAYLOAD, MAX_GPA, MAX_RANGES, MAX_ZSTD_PAYLOAD, RANGE_ENTRY, RANGE_TABLE, READ_FORMATS, RUN_ENTRY_SIZE,
    SECTION_CRC_FIELDS, SECTION_HEADER, SYNC_PAYLOAD, ZERO_RUN, ZSTD_HEADER, SectionKind, check_ranges,
    is_seekable_regular, section_crc)

_COPY_BYTES = CHUNK_PAGES * PAGE_SIZE       # a MEMORY_FILE range is streamed in pieces this size
DIRECT_RUN_PAGES = 16                       # a chunk whose data runs average this many pages is read into RAM


@dataclass(frozen=True)
class Section:
    """A section as read: `payload` for CONFIG/STATE, `file_ranges` for MEMORY_FILE, `gpa` for a
    MEMORY_RUNS chunk. Memory sections' pages are read by StreamReader.read_memory_into."""
    kind: SectionKind
    number: int
    payload: bytes = b""
    file_ranges: tuple[FileRange, ...] = ()
    gpa: int = 0


class StreamReader:
    """Sections of one stream, in order. `mappable`: the source is a seekable regular file whose
    MEMORY_FILE ranges can be mapped instead of read."""

    def __init__(self, fileobj: BinaryIO):
        self._file = fileobj
        self.mappable = is_seekable_regular(fileobj)
        self._base = self._call(fileobj.tell) if self.mappable else 0
        self._file_size = os.fstat(fileobj.fileno()).st_size if self.mappable else None
        self.mappable = self.mappable and self._base % PAGE_SIZE == 0
        self._pos = 0                   # stream bytes consumed
        self._section_end = 0           # where the current section's payload ends
        self._number = 0                # sections read, END excluded
        self._current: Section | None = None
        self._chunk: tuple[np.ndarray, memoryview | None] = None     # MEMORY_RUNS: runs, data (None: in the stream)
        # a streamed chunk's data check so far, expected, at (format 1: the section crc; 2: data_hash)
        self._chunk_crc: tuple[int, int, int] | None = None
        self.format = FORMAT_VERSION
        self._scratch: bytearray | None = None
        self._zscratch: bytearray | None = None     # a compressed chunk as read
        self.finished = False
        self._read_header()

    # -- low-level reads ----------------------------------------------------------------------

    def _error(self, detail: str, at: int | None = None) -> MigrationError:
        return MigrationError(f"reading the migration stream at byte {self._pos if at is None else at}",
                              detail=detail)

    def _call(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except OSError as exc:
            # a socket's own timeout is an OSError without an errno ("timed out"): name it, or the
            # line gives no reason at all (a destination whose link to the source went down)
            detail = None if exc.errno is not None else (
                "nothing arrived in time (is the source, or the connection to it, gone?)"
                if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__)
            raise MigrationError(f"reading the migration stream at byte {getattr(self, '_pos', 0)}",
                                 errno=exc.errno, detail=detail) from exc

    def _read_into(self, view: memoryview, what: str, at_eof: str | None = None) -> None:
        got = 0
        while got < len(view):
            n = self._call(self._file.readinto, view[got:])
            if not n:
                if got == 0 and at_eof:
                    raise self._error(at_eof)
                raise self._error(f"truncated: {what} ends after {got} of {len(view)} bytes")
            got += n
            self._pos += n

    def _read(self, size: int, what: str) -> bytes:
        buffer = bytearray(size)
        self._read_into(memoryview(buffer), what)
        return bytes(buffer)

    def _scratch_view(self, size: int) -> memoryview:
        # Grown on demand: a mapped restore only ever reads the few bytes of END through it, and
        # zeroing a chunk-sized buffer up front cost ~12 ms of a ~50 ms restore.
        if self._scratch is None or len(self._scratch) < size:
            self._scratch = bytearray(max(size, 4096) if size <= 4096 else max(MAX_CHUNK_PAYLOAD, _COPY_BYTES))
        return memoryview(self._scratch)[:size]

    def _skip_to(self, position: int) -> None:
        if position <= self._pos:
            return
        if self.mappable:
            self._call(self._file.seek, self._base + position)
            self._pos = position
        while self._pos < position:
            self._read_into(self._scratch_view(min(position - self._pos, _COPY_BYTES)), "skipped data")

    # -- the header and sections --------------------------------------------------------------

    def _read_header(self) -> None:
        first = self._call(self._file.read, FILE_HEADER.size)
        if not first:
            raise self._error("the stream is empty")
        self._pos = len(first)
        if len(first) < len(MAGIC) and MAGIC.startswith(first):
            raise self._error(f"truncated: the header ends after {len(first)} bytes")
        if first[:len(MAGIC)] != MAGIC:
            raise self._error(f"not a kvmpy snapshot or migration stream (starts {first[:8]!r})", at=0)
        if len(first) < FILE_HEADER.size:
            first += self._read(FILE_HEADER.size - len(first), "the header")
        _, version, flags = FILE_HEADER.unpack(first)
        if version > FORMAT_VERSION:
            raise MigrationError(f"snapshot format {version} is newer than this kvmpy reads ({FORMAT_VERSION})")
        if version not in READ_FORMATS:
            raise self._error(f"unknown snapshot format {version}", at=8)
        self.format = version
        (crc,) = FILE_HEADER_CRC.unpack(self._read(FILE_HEADER_CRC.size, "the header"))
        if crc != zlib.crc32(first):
            raise self._error("header checksum mismatch (corrupt stream)", at=0)
        if flags:
            raise self._error(f"unknown header flags {flags:#x}", at=12)

    def __iter__(self) -> Iterator[Section]:
        while (section := self.next_section()) is not None:
            yield section

    def next_section(self) -> Section | None:
        """The next section, or None once END was read. A memory section not read by the caller
        is skipped (seeked past in a file, read and dropped from a pipe)."""
        if self.finished:
            return None
        if self._chunk_crc is not None:     # a streamed chunk nobody read: its crc all the same
            self._drain_chunk()
        self._skip_to(self._section_end)
        self._current = self._chunk = None
        at = self._pos
        header = bytearray(SECTION_HEADER.size)
        self._read_into(memoryview(header), "a section header",
                        at_eof="the stream ends without its end marker (truncated)")
        raw_kind, reserved, crc, length = SECTION_HEADER.unpack(header)
        try:
            kind = SectionKind(raw_kind)
        except ValueError:
            raise self._error(f"unknown section kind {raw_kind:#04x} (a stream from a newer kvmpy?)", at=at) from None
        if reserved != b"\0\0\0":
            raise self._error(f"{kind.name} section with non-zero reserved bytes", at=at)
        self._section_end = self._pos + length
        if self._file_size is not None and self._base + self._section_end > self._file_size:
            raise self._error(f"truncated: a {kind.name} section of {length} bytes but only "
                              f"{self._file_size - self._base - self._pos} bytes left in the file", at=at)
        if kind is SectionKind.MEMORY_FILE:
            section = self._memory_file(at, crc, length)
        elif kind is SectionKind.MEMORY_RUNS:
            section = self._memory_runs_streamed(at, crc, length)
        else:
            limit = {SectionKind.CONFIG: MAX_STATE_BYTES, SectionKind.STATE: MAX_STATE_BYTES,
                     SectionKind.END: END_PAYLOAD.size,
                     SectionKind.MEMORY_ZSTD: MAX_ZSTD_PAYLOAD, SectionKind.DISK: MAX_DISK_PAYLOAD,
                     SectionKind.SYNC: SYNC_PAYLOAD.size}[kind]
            if length > limit:
                raise self._error(f"{kind.name} section of {length} bytes exceeds its {limit}-byte limit", at=at)
            if kind in (SectionKind.CONFIG, SectionKind.STATE, SectionKind.DISK, SectionKind.SYNC):
                payload = memoryview(bytearray(length))     # bounded by the limit just checked
            elif kind is SectionKind.MEMORY_ZSTD:
                if self._zscratch is None:
                    self._zscratch = bytearray(MAX_ZSTD_PAYLOAD)
                payload = memoryview(self._zscratch)[:length]
            else:
                payload = self._scratch_view(length)
            self._read_into(payload, f"the {kind.name} section")
            if section_crc(kind, length, [payload]) != crc:
                raise self._error(f"{kind.name} section checksum mismatch (corrupt stream)", at=at)
            if kind is SectionKind.END:
                return self._end(payload, at)
            if kind is SectionKind.MEMORY_ZSTD:
                section = self._memory_runs(self._decompress(payload, at), at)
            else:
                section = Section(kind, self._number, payload=payload.tobytes())
        self._number += 1
        self._current = section
        return section

    def _end(self, payload: memoryview, at: int) -> None:
        if len(payload) != END_PAYLOAD.size:
            raise self._error(f"END section of {len(payload)} bytes", at=at)
        (count,) = END_PAYLOAD.unpack(payload)
        if count != self._number:
            raise self._error(f"the end marker counts {count} sections, the stream had {self._number}", at=at)
        self.finished = True
        return None

    def _decompress(self, payload: memoryview, at: int) -> memoryview:
        """A MEMORY_ZSTD payload as the MEMORY_RUNS payload it carries (in the scratch buffer)."""
        from kvmpy.migrate import zstd
        if len(payload) < ZSTD_HEADER.size:
            raise self._error(f"MEMORY_ZSTD section of {len(payload)} bytes", at=at)
        raw_length, reserved = ZSTD_HEADER.unpack(payload[:ZSTD_HEADER.size])
        if reserved or not CHUNK_HEADER.size <= raw_length <= MAX_CHUNK_PAYLOAD:
            raise self._error(f"MEMORY_ZSTD chunk of {raw_length} bytes (at most {MAX_CHUNK_PAYLOAD})", at=at)
        raw = self._scratch_view(raw_length)
        zstd.decompress_into(payload[ZSTD_HEADER.size:], raw)
        return raw

    def _memory_runs_streamed(self, at: int, crc: int, length: int) -> Section:
        """A MEMORY_RUNS chunk's header and run table, checked; its pages stay in the stream for
        read_memory_into (or _drain_chunk), which finish its crc."""
        if length > MAX_CHUNK_PAYLOAD:
            raise self._error(f"MEMORY_RUNS section of {length} bytes exceeds its {MAX_CHUNK_PAYLOAD}-byte limit", at=at)
        if length < CHUNK_HEADER.size:
            raise self._error(f"MEMORY_RUNS section of {length} bytes", at=at)
        header = bytearray(CHUNK_HEADER.size)
        self._read_into(memoryview(header), "the MEMORY_RUNS section")
        gpa, nruns, digest = CHUNK_HEADER.unpack(header)
        table_end = CHUNK_HEADER.size + nruns * RUN_ENTRY_SIZE
        if (digest and self.format == 1) or not 1 <= nruns <= CHUNK_PAGES or table_end > length:
            raise self._error(f"MEMORY_RUNS chunk with {nruns} runs in {length} bytes", at=at)
        table = bytearray(table_end - CHUNK_HEADER.size)
        self._read_into(memoryview(table), "the MEMORY_RUNS section")
        running = zlib.crc32(table, zlib.crc32(header, zlib.crc32(SECTION_CRC_FIELDS.pack(SectionKind.MEMORY_RUNS, length))))
        if self.format == 1:            # the crc goes on over the data
            self._chunk_crc = (running, crc, at)
        elif running != crc:
            raise self._error("MEMORY_RUNS section checksum mismatch (corrupt stream)", at=at)
        else:
            self._chunk_crc = (0, digest, at)
        self._chunk = (self._run_table(table, nruns, length - table_end, at), None)
        return Section(SectionKind.MEMORY_RUNS, self._number, gpa=gpa)

    def _check_data(self, running: int, piece: Any) -> int:
        """A streamed chunk's data check, `running` so far, continued over `piece` (whole pages)."""
        return zlib.crc32(piece, running) if self.format == 1 else data_hash(running, piece)

    def _data_checked(self, running: int, expected: int) -> bool:
        return running == expected if self.format == 1 else hash_digest(running) == expected

    def _drain_chunk(self) -> None:
        """Read the rest of a streamed chunk nobody took, checking its crc."""
        assert self._chunk_crc is not None
        running, expected, at = self._chunk_crc
        self._chunk_crc = None
        while self._pos < self._section_end:
            piece = self._scratch_view(min(self._section_end - self._pos, _COPY_BYTES))
            self._read_into(piece, "the MEMORY_RUNS section")
            running = self._check_data(running, piece)
        if not self._data_checked(running, expected):
            raise self._error("MEMORY_RUNS section checksum mismatch (corrupt stream)", at=at)

    def _memory_runs(self, payload: memoryview, at: int) -> Section:
        """A MEMORY_RUNS payload held in memory (a decompressed MEMORY_ZSTD chunk)."""
        if len(payload) < CHUNK_HEADER.size:
            raise self._error(f"MEMORY_RUNS section of {len(payload)} bytes", at=at)
        gpa, nruns, digest = CHUNK_HEADER.unpack(payload[:CHUNK_HEADER.size])
        table_end = CHUNK_HEADER.size + nruns * RUN_ENTRY_SIZE
        if (digest and self.format == 1) or not 1 <= nruns <= CHUNK_PAGES or table_end > len(payload):
            raise self._error(f"MEMORY_RUNS chunk with {nruns} runs in {len(payload)} bytes", at=at)
        runs_table = self._run_table(payload[CHUNK_HEADER.size:table_end], nruns, len(payload) - table_end, at)
        if self.format != 1 and hash_digest(data_hash(0, payload[table_end:])) != digest:
            raise self._error("MEMORY_RUNS chunk's data hash mismatch (corrupt stream)", at=at)
        self._chunk = (runs_table, payload[table_end:])
        return Section(SectionKind.MEMORY_RUNS, self._number, gpa=gpa)

    def _run_table(self, table: Any, nruns: int, data_bytes: int, at: int) -> np.ndarray:
        """A chunk's runs as rows (first page, count, zero), checked against its data's size."""
        entries = np.frombuffer(table, dtype="<u4", count=2 * nruns)
        entries = entries.reshape(nruns, 2).astype(np.int64)
        counts = entries[:, 1] & (ZERO_RUN - 1)
        zero = (entries[:, 1] & ZERO_RUN) != 0
        data_pages = int(counts[~zero].sum())
        if (counts < 1).any() or int(counts.sum()) > CHUNK_PAGES:
            raise self._error(f"MEMORY_RUNS chunk covering {int(counts.sum())} pages in runs of "
                              f"{counts.min()}..{counts.max()}", at=at)
        if data_pages * PAGE_SIZE != data_bytes:
            raise self._error(f"MEMORY_RUNS chunk: {data_pages} pages of data but {data_bytes} bytes", at=at)
        return np.stack([entries[:, 0], counts, zero], axis=1)

    def _memory_file(self, at: int, crc: int, length: int) -> Section:
        payload_start = self._pos
        count, reserved = RANGE_TABLE.unpack(self._read(RANGE_TABLE.size, "a memory range table"))
        if reserved or not 1 <= count <= MAX_RANGES:
            raise self._error(f"MEMORY_FILE section with {count} ranges", at=at)
        entries_raw = self._read(count * RANGE_ENTRY.size, "a memory range table")
        table = RANGE_TABLE.pack(count, reserved) + entries_raw
        if section_crc(SectionKind.MEMORY_FILE, length, [table]) != crc:
            raise self._error("MEMORY_FILE range table checksum mismatch (corrupt stream)", at=at)
        expected_offset = -(-self._pos // PAGE_SIZE) * PAGE_SIZE
        ranges: list[FileRange] = []
        for index in range(count):
            gpa, size, offset, checksum, zero = RANGE_ENTRY.unpack_from(entries_raw, index * RANGE_ENTRY.size)
            if zero or gpa % PAGE_SIZE or size % PAGE_SIZE or not size or gpa + size > MAX_GPA \
                    or offset != expected_offset:
                raise self._error(f"MEMORY_FILE range {index}: gpa {gpa:#x} size {size:#x} offset "
                                  f"{offset:#x} (expected offset {expected_offset:#x})", at=at)
            ranges.append(FileRange(gpa, size, self._base + offset, checksum))
            expected_offset += size
        by_gpa = sorted(ranges, key=lambda r: r.gpa)
        if any(a.gpa + a.size > b.gpa for a, b in zip(by_gpa, by_gpa[1:])):
            raise self._error("MEMORY_FILE ranges overlap", at=at)
        if expected_offset != payload_start + length:
            raise self._error(f"MEMORY_FILE section length {length} does not match its ranges", at=at)
        if self._file_size is not None and self._base + expected_offset > self._file_size:
            raise self._error(f"truncated: the memory image ends at byte {expected_offset} but the "
                              f"file has {self._file_size - self._base}", at=at)
        return Section(SectionKind.MEMORY_FILE, self._number, file_ranges=tuple(ranges))

    # -- guest memory -------------------------------------------------------------------------

    def read_memory_into(self, section: Section, ranges: Sequence[tuple[int, Any]]) -> None:
        """Copy the pages of the memory section just returned by next_section() into the
        caller's RAM, [(gpa, writable buffer)]. A MEMORY_FILE range must match a buffer's gpa and
        size exactly, and its checksum is verified; a chunk's pages must lie inside its range."""
        if section is not self._current or section.kind not in (SectionKind.MEMORY_FILE, SectionKind.MEMORY_RUNS):
            raise ValueError("read_memory_into takes the memory section next_section() just returned")
        targets = dict(check_ranges(ranges, "restoring guest memory", writable=True))
        self._current = None
        if section.kind is SectionKind.MEMORY_RUNS:
            self._copy_chunk(section.gpa, targets)
            return
        check_file_ranges(section.file_ranges, [(gpa, view.size) for gpa, view in targets.items()])
        padding = section.file_ranges[0].file_offset - self._base - self._pos
        if not self.mappable and padding:
            gap = self._scratch_view(padding)
            self._read_into(gap, "the padding before the memory image")
            if any(gap):
                raise self._error("non-zero padding before the memory image (corrupt stream)")
        for file_range in section.file_ranges:
            self._skip_to(file_range.file_offset - self._base)
            self._copy_file_range(file_range, targets[file_range.gpa])

    def _copy_chunk(self, gpa: int, targets: dict[int, np.ndarray]) -> None:
        assert self._chunk is not None
        runs_table, data = self._chunk
        target = targets.get(gpa)
        if target is None:
            raise self._error(f"a memory chunk for gpa {gpa:#x}, which is not a RAM range here")
        ends = runs_table[:, 0] + runs_table[:, 1]
        if int(ends.max()) > target.size // PAGE_SIZE:
            raise self._error(f"a memory chunk for page {int(ends.max()) - 1} of the "
                              f"{target.size // PAGE_SIZE}-page range at {gpa:#x}")
        if data is None:
            self._receive_chunk(gpa, runs_table, target)
        else:
            scatter_pages(target, runs_table, data)

    def _receive_chunk(self, gpa: int, runs_table: np.ndarray, target: np.ndarray) -> None:
        """A streamed chunk's pages, read from the stream into their places in `target`."""
        assert self._chunk_crc is not None
        running, expected, at = self._chunk_crc
        self._chunk_crc = None
        data_runs = runs_table[runs_table[:, 2] == 0]
        data_pages = int(data_runs[:, 1].sum())
        if data_pages < DIRECT_RUN_PAGES * len(data_runs):
            data = self._scratch_view(data_pages * PAGE_SIZE)
            self._read_into(data, f"a memory chunk for RAM at {gpa:#x}")
            if not self._data_checked(self._check_data(running, data), expected):
                raise self._error("MEMORY_RUNS section checksum mismatch (corrupt stream)", at=at)
            scatter_pages(target, runs_table, data)
            return
        for first, count, zero in runs_table.tolist():
            span = target[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
            if zero:
                span[:] = 0
            else:
                view = memoryview(span)
                self._read_into(view, f"RAM at {gpa + first * PAGE_SIZE:#x}")
                running = self._check_data(running, view)
        if not self._data_checked(running, expected):
            raise self._error("MEMORY_RUNS section checksum mismatch (corrupt stream)", at=at)

    def _copy_file_range(self, file_range: FileRange, target: np.ndarray) -> None:
        """Stream one range out of a MEMORY_FILE section, writing only its non-zero pages."""
        checksum = RangeChecksum()
        nonzero_parts = []
        for start in range(0, file_range.size, _COPY_BYTES):
            piece = self._scratch_view(min(_COPY_BYTES, file_range.size - start))
            self._read_into(piece, f"RAM at {file_range.gpa + start:#x}")
            array = np.frombuffer(piece, dtype=np.uint8)
            nonzero = nonzero_pages(array)
            for first, count in runs(nonzero):
                pages = array[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
                target[start + first * PAGE_SIZE:start + (first + count) * PAGE_SIZE] = pages
                checksum.update(pages)
            nonzero_parts.append(nonzero)
        if checksum.finish(np.concatenate(nonzero_parts)) != file_range.checksum:
            raise self._error(f"RAM at {file_range.gpa:#x} fails its checksum (corrupt snapshot)")
