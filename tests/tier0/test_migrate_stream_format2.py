"""Stream format 2: a MEMORY_RUNS chunk's section crc covers its header and run table, and the
data_hash in its header covers its pages (crc32 of every page cost 14-20 us a page on each side
of a live pass in L1). The hash must catch a change to any page wherever the reader takes the
pages (scratch for scattered pages, straight into RAM for long runs, a chunk nobody read, a
decompressed chunk); format-1 streams (crc over the data, the field zero) still read."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.errors import MigrationError
from kvmpy.migrate import pages as pages_mod
from kvmpy.migrate.pages import PAGE_SIZE, data_hash, hash_digest
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import (CHUNK_HEADER, FORMAT_VERSION, SECTION_HEADER, SectionKind, StreamWriter,
                                  section_crc)

from test_migrate_stream import Pipe, chunk_section, hand_stream

PAGES = 64


def live_stream(ram: np.ndarray, page_runs: list[tuple[int, int]]) -> bytes:
    """A header, then the chunks a live pass writes for `page_runs` of `ram`, then END."""
    import io
    out = io.BytesIO()
    writer = StreamWriter(out, sparse=False)
    writer.write_header()
    writer.copy_pages = True
    writer.write_pages(0, ram, page_runs)
    writer.finish()
    return out.getvalue()


def read_into(stream: bytes, pages: int = PAGES, skip_memory: bool = False) -> np.ndarray:
    target = np.zeros(pages * PAGE_SIZE, np.uint8)
    reader = StreamReader(Pipe(stream))
    for section in reader:
        if section.kind is SectionKind.MEMORY_RUNS and not skip_memory:
            reader.read_memory_into(section, [(0, target)])
    return target


def sample(seed: int = 3) -> np.ndarray:
    ram = np.random.default_rng(seed).integers(1, 256, PAGES * PAGE_SIZE, dtype=np.uint8)
    ram[5 * PAGE_SIZE:6 * PAGE_SIZE] = 0                        # a zero page among the data
    return ram


SCATTERED = [(p, 1) for p in range(0, PAGES, 3)]                # through scratch
LONG = [(0, 40), (44, 20)]                                      # straight into RAM


@pytest.mark.parametrize("page_runs", [SCATTERED, LONG], ids=["scattered", "long runs"])
def test_a_format2_stream_reads_back_exactly(page_runs):
    ram = sample()
    stream = live_stream(ram, page_runs)
    assert struct.unpack_from("<I", stream, 8)[0] == FORMAT_VERSION == 2
    target = read_into(stream)
    for first, count in page_runs:
        span = slice(first * PAGE_SIZE, (first + count) * PAGE_SIZE)
        assert np.array_equal(target[span], ram[span])


def _data_offsets(stream: bytes) -> list[tuple[int, int, int]]:
    """(section offset, data offset, data length) of each MEMORY_RUNS section."""
    found, pos = [], 20
    while pos < len(stream):
        kind, _, _, length = SECTION_HEADER.unpack_from(stream, pos)
        if kind == SectionKind.MEMORY_RUNS:
            nruns = CHUNK_HEADER.unpack_from(stream, pos + SECTION_HEADER.size)[1]
            data_at = pos + SECTION_HEADER.size + CHUNK_HEADER.size + 8 * nruns
            found.append((pos, data_at, pos + SECTION_HEADER.size + length - data_at))
        pos += SECTION_HEADER.size + length
    return found


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_changed_data_byte_is_a_checksum_mismatch(data):
    """The section crc no longer covers the pages: a flip there passes it, and the hash catches
    it, whether the reader takes the pages or skips the section."""
    page_runs = data.draw(st.sampled_from([SCATTERED, LONG]))
    stream = bytearray(live_stream(sample(), page_runs))
    _, data_at, length = data.draw(st.sampled_from(_data_offsets(bytes(stream))))
    stream[data_at + data.draw(st.integers(0, length - 1))] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(MigrationError, match="checksum mismatch"):
        read_into(bytes(stream), skip_memory=data.draw(st.booleans()))


def test_a_changed_run_table_fails_before_any_page_is_written():
    stream = bytearray(live_stream(sample(), SCATTERED))
    section_at, data_at, _ = _data_offsets(bytes(stream))[0]
    stream[data_at - 8] ^= 1                                    # the last run's first page
    target = np.full(PAGES * PAGE_SIZE, 0x55, np.uint8)
    reader = StreamReader(Pipe(bytes(stream)))
    with pytest.raises(MigrationError, match="checksum mismatch"):
        for section in reader:
            reader.read_memory_into(section, [(0, target)])
    assert (target == 0x55).all()


def test_format1_streams_still_read_and_their_zero_field_is_checked():
    page = bytes(range(256)) * (PAGE_SIZE // 256)
    target = read_into(hand_stream(chunk_section(0, [(2, 1)], page)), pages=4)     # version 1
    assert bytes(target[2 * PAGE_SIZE:3 * PAGE_SIZE]) == page
    payload = CHUNK_HEADER.pack(0, 1, 7) + struct.pack("<II", 2, 1) + page        # a hash in format 1
    crc = section_crc(SectionKind.MEMORY_RUNS, len(payload), [payload])
    section = SECTION_HEADER.pack(SectionKind.MEMORY_RUNS, b"\0\0\0", crc, len(payload)) + payload
    with pytest.raises(MigrationError, match="MEMORY_RUNS chunk with 1 runs"):
        read_into(hand_stream(section), pages=4)


def test_a_compressed_chunk_checks_its_data_hash():
    """A MEMORY_ZSTD frame whose section crc is right but whose chunk's pages do not match the
    hash in its header (a bug on the writer's side, or a frame corrupted before its crc)."""
    from kvmpy.migrate import zstd
    from kvmpy.migrate.stream import FILE_HEADER, FILE_HEADER_CRC, MAGIC, ZSTD_HEADER
    if not zstd.available():
        pytest.fail("libzstd is missing (the compress capability's tests need it)")
    page = b"\x11" * PAGE_SIZE
    for digest, ok in ((hash_digest(data_hash(0, page)), True), (hash_digest(data_hash(0, page)) ^ 1, False)):
        raw = CHUNK_HEADER.pack(0, 1, digest) + struct.pack("<II", 1, 1) + page
        payload = ZSTD_HEADER.pack(len(raw), 0) + zstd.compress(raw)
        section = SECTION_HEADER.pack(SectionKind.MEMORY_ZSTD, b"\0\0\0",
                                      section_crc(SectionKind.MEMORY_ZSTD, len(payload), [payload]), len(payload))
        header = FILE_HEADER.pack(MAGIC, 2, 0)
        end = struct.pack("<Q", 1)
        stream = (header + FILE_HEADER_CRC.pack(zlib.crc32(header)) + section + payload
                  + SECTION_HEADER.pack(SectionKind.END, b"\0\0\0", section_crc(0xFF, 8, [end]), 8) + end)
        if ok:
            assert bytes(read_into(stream, pages=2)[PAGE_SIZE:]) == page
        else:
            with pytest.raises(MigrationError, match="data hash mismatch"):
                read_into(stream, pages=2)


def test_the_hash_needs_whole_pages_and_chains_across_pieces():
    data = np.random.default_rng(1).integers(0, 256, 5 * PAGE_SIZE, dtype=np.uint8).tobytes()
    assert data_hash(data_hash(0, data[:2 * PAGE_SIZE]), data[2 * PAGE_SIZE:]) == data_hash(0, data)
    assert data_hash(0, data[:PAGE_SIZE] + data[PAGE_SIZE:2 * PAGE_SIZE]) != \
        data_hash(0, data[PAGE_SIZE:2 * PAGE_SIZE] + data[:PAGE_SIZE])                # order counts
    with pytest.raises(ValueError):
        data_hash(0, data[:100])
    saved = pages_mod._C_PAGES
    pages_mod._C_PAGES = [None]
    try:
        reference = data_hash(0, data)
    finally:
        pages_mod._C_PAGES = saved
    if pages_mod._c_pages() is None:
        pytest.fail("the C extension lacks kvmpy_pages_hash (make venv builds it)")
    assert data_hash(0, data) == reference
