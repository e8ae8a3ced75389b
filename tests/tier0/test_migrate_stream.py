"""The migration stream: both memory layouts round trip, a file's memory is a sparse image that
maps back, and truncated, corrupt or hostile streams end in one MigrationError, quickly, without
large allocations and without touching RAM outside the ranges."""
from __future__ import annotations

import errno
import io
import os
import re
import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.errors import MigrationError
from kvmpy.migrate.codec import encode_state
from kvmpy.migrate.pages import PAGE_SIZE, memory_checksum
from kvmpy.migrate.reader import StreamReader, map_file_range, verify_file_range
from kvmpy.migrate.stream import (
    CHUNK_HEADER, CHUNK_PAGES, MAX_CHUNK_PAYLOAD, SECTION_HEADER, ZERO_RUN, SectionKind, StreamWriter,
    section_crc)

CONFIG = encode_state({"memory": 1 << 20, "smp": 2})
STATE = encode_state({"vcpus": [{"rip": 0xFFF0}] * 2, "devices": {"serial": b"\x01" * 8}})
HIGH = 1 << 32


class Pipe(io.RawIOBase):
    """A non-seekable reader over bytes (what exec: or a socket gives)."""

    def __init__(self, source: bytes):
        self.source = io.BytesIO(source)

    def readable(self):
        return True

    def readinto(self, buffer):
        return self.source.readinto(buffer)


class CountingFile(io.FileIO):
    """A seekable regular file that counts the bytes read through it."""
    bytes_read = 0

    def readinto(self, buffer):
        n = super().readinto(buffer)
        CountingFile.bytes_read += n or 0
        return n


def sample_ram(pages: int, pattern: str = "sparse") -> np.ndarray:
    ram = np.zeros(pages * PAGE_SIZE, np.uint8)
    if pattern == "sparse":
        for page in (0, 1, 7, pages // 2, pages - 1):
            ram[page * PAGE_SIZE + 100:page * PAGE_SIZE + 200] = page % 251 + 1
    elif pattern == "full":
        ram[:] = np.tile((np.arange(PAGE_SIZE) % 251 + 1).astype(np.uint8), pages)
        ram.reshape(pages, PAGE_SIZE)[:, 0] = np.arange(pages) % 255 + 1
    elif pattern == "alternate":
        for page in range(0, pages, 2):
            ram[page * PAGE_SIZE + 4095] = 0xAA
    return ram


def write_stream(fileobj, ranges, sparse=None) -> StreamWriter:
    writer = StreamWriter(fileobj, sparse=sparse)
    writer.write_header()
    writer.write_section(SectionKind.CONFIG, CONFIG)
    writer.write_memory(ranges)
    writer.write_section(SectionKind.STATE, STATE)
    writer.finish()
    return writer


def read_all(fileobj, ranges) -> dict:
    """Read every section, copying memory into `ranges` (fresh zero buffers of the same shape)."""
    reader = StreamReader(fileobj)
    targets = [(gpa, np.zeros_like(buf)) for gpa, buf in ranges]
    seen = {}
    for section in reader:
        seen.setdefault(section.kind, []).append(section)
        if section.kind in (SectionKind.MEMORY_FILE, SectionKind.MEMORY_RUNS):
            reader.read_memory_into(section, targets)
    return {"sections": seen, "ram": targets, "reader": reader}


def pipe_stream(ranges) -> bytes:
    out = io.BytesIO()
    assert not write_stream(out, ranges).sparse
    return out.getvalue()


@pytest.mark.parametrize("pattern", ["sparse", "full", "alternate", "zero"])
def test_pipe_layout_round_trip(pattern):
    ranges = [(0, sample_ram(2 * CHUNK_PAGES + 5, pattern)), (HIGH, sample_ram(3, pattern))]
    out = io.BytesIO()
    writer = write_stream(out, ranges)
    result = read_all(Pipe(out.getvalue()), ranges)
    for (_, original), (_, restored) in zip(ranges, result["ram"]):
        assert np.array_equal(original, restored)
    assert [s.payload for s in result["sections"][SectionKind.CONFIG]] == [CONFIG]
    assert [s.payload for s in result["sections"][SectionKind.STATE]] == [STATE]
    nonzero = sum(int(buf.reshape(-1, PAGE_SIZE).any(axis=1).sum()) for _, buf in ranges)
    assert writer.page_bytes_written == nonzero * PAGE_SIZE     # zero pages are not sent at all
    chunks = result["sections"].get(SectionKind.MEMORY_RUNS, [])
    sizes = []                                                  # each chunk is bounded
    position = 20
    while position < len(out.getvalue()):
        kind, _, _, length = SECTION_HEADER.unpack_from(out.getvalue(), position)
        sizes += [length] if kind == SectionKind.MEMORY_RUNS else []
        position += SECTION_HEADER.size + length
    assert len(sizes) == len(chunks) and max(sizes, default=0) <= MAX_CHUNK_PAYLOAD
    if pattern == "full":
        assert len(chunks) == 4                                 # 2053 + 3 pages: 3 + 1 chunks


def test_write_pages_sends_zero_runs_for_a_later_pass():
    ram = sample_ram(64, "full")
    ram[10 * PAGE_SIZE:20 * PAGE_SIZE] = 0                  # pages that became zero since pass 1
    out = io.BytesIO()
    writer = StreamWriter(out, sparse=False)
    writer.write_header()
    writer.write_pages(0, ram, [(5, 20), (60, 4)])
    writer.finish()
    target = np.full_like(ram, 0x77)                        # the destination's stale copy
    reader = StreamReader(Pipe(out.getvalue()))
    for section in reader:
        reader.read_memory_into(section, [(0, target)])
    pages = target.reshape(-1, PAGE_SIZE)
    expected = ram.reshape(-1, PAGE_SIZE)
    assert np.array_equal(pages[5:25], expected[5:25]) and np.array_equal(pages[60:], expected[60:])
    assert (pages[:5] == 0x77).all() and (pages[25:60] == 0x77).all()
    with pytest.raises(MigrationError, match="outside"):
        writer2 = StreamWriter(io.BytesIO(), sparse=False)
        writer2.write_header()
        writer2.write_pages(0, ram, [(60, 5)])


def test_file_layout_is_sparse_and_maps_back(tmp_path):
    big = sample_ram(16384)                                 # 64 MiB, 5 non-zero pages
    small = sample_ram(4, "full")
    path = tmp_path / "snap"
    with open(path, "wb") as f:
        writer = write_stream(f, [(0, big), (HIGH, small)])
        assert writer.sparse and writer.page_bytes_written == 9 * PAGE_SIZE
    st_ = os.stat(path)
    assert st_.st_size > big.size
    assert st_.st_blocks * 512 < 1 << 20                   # holes, not 64 MiB of zeros
    CountingFile.bytes_read = 0
    with CountingFile(path) as f:
        reader = StreamReader(f)
        assert reader.mappable
        sections = list(reader)
        assert CountingFile.bytes_read < 64 << 10           # the RAM itself was never read
        [memory] = [s for s in sections if s.kind == SectionKind.MEMORY_FILE]
        assert [(r.gpa, r.size) for r in memory.file_ranges] == [(0, big.size), (HIGH, small.size)]
        for file_range, original in zip(memory.file_ranges, (big, small)):
            assert file_range.file_offset % PAGE_SIZE == 0
            mapping = map_file_range(f, file_range)
            view = np.frombuffer(mapping, np.uint8)
            assert np.array_equal(view, original)
            verify_file_range(view, file_range)
            view[0] ^= 1                                    # private: the file is not modified
            del view
            mapping.close()
    assert memory_checksum(big) == memory.file_ranges[0].checksum
    with open(path, "rb") as f:                             # read instead of mapped: same bytes
        result = read_all(f, [(0, big), (HIGH, small)])
    assert np.array_equal(result["ram"][0][1], big) and np.array_equal(result["ram"][1][1], small)


def test_file_layout_read_through_a_pipe(tmp_path):
    """exec:cat FILE: the file layout arrives through a pipe and is copied, holes included."""
    ranges = [(0, sample_ram(300, "alternate")), (HIGH, sample_ram(2, "full"))]
    path = tmp_path / "snap"
    with open(path, "wb") as f:
        write_stream(f, ranges)
    result = read_all(Pipe(path.read_bytes()), ranges)
    assert not result["reader"].mappable
    for (_, original), (_, restored) in zip(ranges, result["ram"]):
        assert np.array_equal(original, restored)


def test_file_layout_corrupt_page_is_caught_by_checksum(tmp_path):
    ranges = [(0, sample_ram(64))]
    path = tmp_path / "snap"
    with open(path, "wb") as f:
        write_stream(f, ranges)
    with open(path, "rb") as f:
        [memory] = [s for s in StreamReader(f) if s.kind == SectionKind.MEMORY_FILE]
    offset = memory.file_ranges[0].file_offset
    for where in (offset + 150, offset + 3 * PAGE_SIZE):    # a data byte, a hole turned non-zero
        data = bytearray(path.read_bytes())
        data[where] ^= 0x40
        with pytest.raises(MigrationError, match="checksum"):
            read_all(Pipe(bytes(data)), ranges)
        (tmp_path / "bad").write_bytes(data)
        with open(tmp_path / "bad", "rb") as f:
            reader = StreamReader(f)
            [memory] = [s for s in reader if s.kind == SectionKind.MEMORY_FILE]
            mapping = map_file_range(f, memory.file_ranges[0])
            with pytest.raises(MigrationError, match="checksum"):
                verify_file_range(mapping, memory.file_ranges[0])
            mapping.close()


def test_memory_must_match_the_destination(tmp_path):
    ram = sample_ram(8)
    path = tmp_path / "snap"
    with open(path, "wb") as f:
        write_stream(f, [(0, ram)])
    for targets, message in (([(0, np.zeros(4 * PAGE_SIZE, np.uint8))], "this machine has 0x4000"),
                             ([(HIGH, np.zeros_like(ram))], "has nothing there"),
                             ([(0, np.zeros_like(ram)), (HIGH, np.zeros_like(ram))], "the snapshot has none"),
                             ([(0, bytes(ram.size))], "read-only")):
        with open(path, "rb") as f:
            reader = StreamReader(f)
            section = next(s for s in reader if s.kind == SectionKind.MEMORY_FILE)
            with pytest.raises(MigrationError, match=message):
                reader.read_memory_into(section, targets)
    stream = pipe_stream([(0, ram)])
    for targets, message in (([(0, np.zeros(PAGE_SIZE, np.uint8))], "page 7 of the 1-page"),
                             ([(HIGH, np.zeros_like(ram))], "not a RAM range here")):
        reader = StreamReader(Pipe(stream))
        section = next(s for s in reader if s.kind == SectionKind.MEMORY_RUNS)
        with pytest.raises(MigrationError, match=message):
            reader.read_memory_into(section, targets)


def chunk_section(gpa: int, entries: list[tuple[int, int]], data: bytes = b"") -> bytes:
    payload = CHUNK_HEADER.pack(gpa, len(entries), 0) + np.array(entries, "<u4").tobytes() + data
    crc = section_crc(SectionKind.MEMORY_RUNS, len(payload), [payload])
    return SECTION_HEADER.pack(SectionKind.MEMORY_RUNS, b"\0\0\0", crc, len(payload)) + payload


def hand_stream(*sections: bytes) -> bytes:
    header = b"KVMPYMIG" + struct.pack("<II", 1, 0)
    end = struct.pack("<Q", len(sections))
    end_section = SECTION_HEADER.pack(SectionKind.END, b"\0\0\0", section_crc(0xFF, 8, [end]), 8) + end
    return header + struct.pack("<I", zlib.crc32(header)) + b"".join(sections) + end_section


@pytest.mark.parametrize("entries, data_pages, message", [
    ([(7, 1)], 1, "page 7 of the 4-page"),
    ([(3, 2)], 2, "page 4 of the 4-page"),
    ([(2**32 - 1, 1)], 1, "page 4294967295"),
    ([(0, 0)], 0, "runs of 0"),
    ([(0, ZERO_RUN | 1000), (0, ZERO_RUN | 1000)], 0, "covering 2000 pages"),
    ([(0, 1)], 2, "1 pages of data but 8192 bytes"),
])
def test_run_lists_out_of_range_are_refused(entries, data_pages, message):
    target = np.full(4 * PAGE_SIZE, 0x55, np.uint8)
    stream = hand_stream(chunk_section(0, entries, b"\x01" * (data_pages * PAGE_SIZE)))
    with pytest.raises(MigrationError, match=message):
        reader = StreamReader(Pipe(stream))
        for section in reader:
            reader.read_memory_into(section, [(0, target)])
    assert (target == 0x55).all()                           # nothing was written


def test_header_and_end_checks():
    good = pipe_stream([(0, sample_ram(4))])
    cases = [
        (b"", "empty"), (b"KVMPY", "truncated"), (b"QFI\xfb" + good[4:], "not a kvmpy"),
        (good[:8] + struct.pack("<I", 3) + good[12:], "snapshot format 3 is newer than this kvmpy reads (2)"),
        (good[:8] + struct.pack("<I", 0) + good[12:], "unknown snapshot format 0"),
        (good[:12] + b"\x01" + good[13:], "header checksum"),
        (good[:-(SECTION_HEADER.size + 8)], "ends without its end marker"),
        (good[:20] + bytes([0x42]) + good[21:], "unknown section kind 0x42"),
        (hand_stream()[:-8] + struct.pack("<Q", 5), "END section checksum"),
    ]
    for stream, message in cases:
        with pytest.raises(MigrationError, match=re.escape(message)):
            read_all(Pipe(stream), [(0, sample_ram(4))])
    end = struct.pack("<Q", 3)
    bad_end = hand_stream()[:20] + SECTION_HEADER.pack(0xFF, b"\0\0\0", section_crc(0xFF, 8, [end]), 8) + end
    with pytest.raises(MigrationError, match="counts 3 sections, the stream had 0"):
        read_all(Pipe(bad_end), [])


@pytest.mark.parametrize("kind", [SectionKind.CONFIG, SectionKind.STATE, SectionKind.MEMORY_RUNS,
                                  SectionKind.END, SectionKind.MEMORY_FILE])
@pytest.mark.parametrize("length", [2**62, 2**64 - 1, MAX_CHUNK_PAYLOAD + 1, 65 << 20])
def test_huge_lengths_refused_before_allocating(tmp_path, kind, length):
    section = SECTION_HEADER.pack(kind, b"\0\0\0", 0, length) + b"\x01\x00\x00\x00\x00\x00\x00\x00"
    stream = hand_stream(section)
    path = tmp_path / "s"
    path.write_bytes(stream)
    for source in (lambda: Pipe(stream), lambda: open(path, "rb")):
        tracemalloc.start()
        started = time.monotonic()
        try:
            with pytest.raises(MigrationError):
                read_all(source(), [(0, sample_ram(4))])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 8 << 20 and time.monotonic() - started < 2


_STREAMS: dict[str, bytes] = {}


@pytest.mark.parametrize("layout", ["pipe", "file"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_truncated_and_flipped_streams_fail_cleanly(tmp_path, layout, data):
    ranges = [(0, sample_ram(20, "alternate")), (HIGH, sample_ram(3))]
    if layout not in _STREAMS:
        if layout == "pipe":
            _STREAMS[layout] = pipe_stream(ranges)
        else:
            path = tmp_path / "snap"
            with open(path, "wb") as f:
                write_stream(f, ranges)
            _STREAMS[layout] = path.read_bytes()
    stream = _STREAMS[layout]
    mutated = bytearray(stream)
    if data.draw(st.booleans()):
        mutated = mutated[:data.draw(st.integers(0, len(stream) - 1))]
    else:
        index = data.draw(st.integers(0, len(stream) - 1))
        mutated[index] ^= 1 << data.draw(st.integers(0, 7))
    bad = tmp_path / "bad"
    bad.write_bytes(mutated)
    # every byte is covered by a crc, a checksum, a length or a zero check when read as a stream
    with pytest.raises(MigrationError):
        read_all(Pipe(bytes(mutated)), ranges)
    with open(bad, "rb") as f:                              # a file: no hang at EOF either
        try:
            read_all(f, ranges)
        except MigrationError:
            pass


def test_padding_in_the_file_layout_is_checked_when_streamed(tmp_path):
    path = tmp_path / "snap"
    with open(path, "wb") as f:
        write_stream(f, [(0, sample_ram(4))])
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:
        [memory] = [s for s in StreamReader(f) if s.kind == SectionKind.MEMORY_FILE]
    data[memory.file_ranges[0].file_offset - 1] = 1
    with pytest.raises(MigrationError, match="padding"):
        read_all(Pipe(bytes(data)), [(0, sample_ram(4))])


def test_truncated_file_refused_before_mapping(tmp_path):
    path = tmp_path / "snap"
    with open(path, "wb") as f:
        write_stream(f, [(0, sample_ram(256))])
    data = path.read_bytes()
    with open(path, "rb") as f:
        [memory] = [s for s in StreamReader(f) if s.kind == SectionKind.MEMORY_FILE]
    path.write_bytes(data[:memory.file_ranges[0].file_offset + PAGE_SIZE])
    with open(path, "rb") as f:
        reader = StreamReader(f)
        with pytest.raises(MigrationError, match="truncated"):
            list(reader)


def test_a_pipe_with_its_writer_gone_ends(tmp_path):
    read_fd, write_fd = os.pipe()
    stream = pipe_stream([(0, sample_ram(4))])
    os.write(write_fd, stream[:len(stream) // 2])
    os.close(write_fd)
    outcome = []

    def reader():
        with os.fdopen(read_fd, "rb") as f:
            try:
                read_all(f, [(0, sample_ram(4))])
            except MigrationError as exc:
                outcome.append(exc)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and len(outcome) == 1 and "truncated" in str(outcome[0])


def test_disk_full_while_writing_is_one_error():
    for buffering in (0, -1):
        with open("/dev/full", "wb", buffering=buffering) as f:
            writer = StreamWriter(f)
            assert not writer.sparse
            with pytest.raises(MigrationError) as err:
                writer.write_header()
                writer.write_memory([(0, sample_ram(64, "full"))])
                writer.finish()
            assert err.value.errno == errno.ENOSPC
            f.raw.close() if buffering else None            # drop what the buffer still holds


def test_short_writes_are_completed():
    class Dribble(io.RawIOBase):                            # an unbuffered pipe may take less
        def __init__(self):
            self.taken = bytearray()

        def writable(self):
            return True

        def write(self, data):
            self.taken += memoryview(data)[:1000]
            return min(1000, memoryview(data).nbytes)
    target, ranges = Dribble(), [(0, sample_ram(8, "full"))]
    write_stream(target, ranges)
    assert np.array_equal(read_all(Pipe(bytes(target.taken)), ranges)["ram"][0][1], ranges[0][1])


def test_writer_misuse_is_refused(tmp_path):
    writer = StreamWriter(io.BytesIO())
    with pytest.raises(MigrationError, match="after write_header"):
        writer.write_section(SectionKind.CONFIG, CONFIG)
    writer.write_header()
    with pytest.raises(MigrationError, match="CONFIG or STATE"):
        writer.write_section(SectionKind.END, b"")
    with pytest.raises(MigrationError, match="unaligned"):
        writer.write_memory([(100, sample_ram(1))])
    with pytest.raises(MigrationError, match="overlaps"):
        writer.write_memory([(0, sample_ram(2)), (PAGE_SIZE, sample_ram(2))])
    with pytest.raises(MigrationError, match="multiple of 4096"):
        writer.write_memory([(0, np.zeros(100, np.uint8))])
    with pytest.raises(MigrationError, match="seekable regular file"):
        StreamWriter(io.BytesIO(), sparse=True)
    with open(tmp_path / "f", "wb") as f:
        writer = StreamWriter(f)
        writer.write_header()
        writer.write_memory([(0, sample_ram(1))])
        with pytest.raises(MigrationError, match="one memory section"):
            writer.write_memory([(0, sample_ram(1))])
    reader = StreamReader(Pipe(pipe_stream([(0, sample_ram(4))])))
    config = reader.next_section()
    with pytest.raises(ValueError):
        reader.read_memory_into(config, [])

