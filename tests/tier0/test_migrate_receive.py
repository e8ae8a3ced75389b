"""The destination's receive path for MEMORY_RUNS chunks (kvmpy/migrate/reader.py): long runs read
straight into RAM, scattered pages read whole and scattered by numpy, and both still refuse any
corrupt byte; a chunk nobody reads still has its crc checked. Against a hand-built stream and the
real writer, over a pipe-like reader and a socket pair."""
from __future__ import annotations

import io
import socket
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.errors import MigrationError
from kvmpy.migrate import reader as reader_module
from kvmpy.migrate.pages import PAGE_SIZE
from kvmpy.migrate.precopy import receive_memory_and_state
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import SectionKind, StreamWriter

PAGES = 256


class Pipe(io.RawIOBase):
    """A non-seekable reader over bytes, handing out at most `piece` bytes per read."""

    def __init__(self, source: bytes, piece: int = 1 << 30):
        self.source, self.piece = io.BytesIO(source), piece

    def readable(self):
        return True

    def readinto(self, buffer):
        view = memoryview(buffer)[:self.piece]
        return self.source.readinto(view)


def ram_with(pattern: str, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ram = rng.integers(1, 255, size=PAGES * PAGE_SIZE, dtype=np.uint8)
    if pattern == "holes":
        ram.reshape(PAGES, PAGE_SIZE)[[3, 4, 100, 200]] = 0
    return ram


def stream_of(ram: np.ndarray, page_runs=None) -> bytes:
    """The live layout: all of `ram` (long runs), or `page_runs` of it (a dirty pass), then STATE."""
    out = io.BytesIO()
    writer = StreamWriter(out, sparse=False)
    writer.write_header()
    if page_runs is None:
        writer.write_memory([(0, ram)])
    else:
        writer.write_pages(0, ram, page_runs)
    writer.write_section(SectionKind.STATE, b"state")
    writer.finish()
    return out.getvalue()


SCATTERED = [(p, 1) for p in range(0, PAGES, 3)] + [(PAGES - 2, 2)]


@pytest.mark.parametrize("shape", ["long runs", "scattered"])
@pytest.mark.parametrize("piece", [1 << 30, 4096, 1000])
def test_pages_land_where_they_belong(shape, piece):
    ram = ram_with("holes")
    page_runs = None if shape == "long runs" else SCATTERED
    target = np.full_like(ram, 0x55)
    state = receive_memory_and_state(StreamReader(Pipe(stream_of(ram, page_runs), piece)), [(0, target)])
    assert state == b"state"
    if page_runs is None:
        assert np.array_equal(target.reshape(PAGES, -1)[[0, 1, 2, 5, 255]], ram.reshape(PAGES, -1)[[0, 1, 2, 5, 255]])
        # the first pass leaves zero pages out: what was there stays
        assert (target.reshape(PAGES, -1)[[3, 4, 100, 200]] == 0x55).all()
    else:
        sent = sorted({p for first, count in page_runs for p in range(first, first + count)})
        assert np.array_equal(target.reshape(PAGES, -1)[sent], ram.reshape(PAGES, -1)[sent])
        untouched = sorted(set(range(PAGES)) - set(sent))
        assert (target.reshape(PAGES, -1)[untouched] == 0x55).all()


def test_the_long_run_path_reads_into_ram_and_the_scattered_one_through_scratch(monkeypatch):
    """Which path a chunk takes is its runs' average length (DIRECT_RUN_PAGES)."""
    seen = []
    real = reader_module.scatter_pages
    monkeypatch.setattr(reader_module, "scatter_pages", lambda *a: (seen.append("scatter"), real(*a)))
    ram = ram_with("holes")
    receive_memory_and_state(StreamReader(Pipe(stream_of(ram))), [(0, np.zeros_like(ram))])
    assert seen == []
    receive_memory_and_state(StreamReader(Pipe(stream_of(ram, SCATTERED))), [(0, np.zeros_like(ram))])
    assert seen == ["scatter"]


@settings(max_examples=80, deadline=None)
@given(shape=st.sampled_from(["long runs", "scattered"]), data=st.data())
def test_any_flipped_byte_of_a_chunk_is_refused(shape, data):
    ram = ram_with("holes")
    stream = bytearray(stream_of(ram, None if shape == "long runs" else SCATTERED))
    index = data.draw(st.integers(24, len(stream) - 1))       # past the stream header
    stream[index] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(MigrationError):
        receive_memory_and_state(StreamReader(Pipe(bytes(stream))), [(0, np.zeros_like(ram))])


def test_a_corrupt_scattered_chunk_writes_nothing():
    ram = ram_with("plain")
    stream = bytearray(stream_of(ram, SCATTERED))
    stream[-200 - 64] ^= 1                  # in the last page's data (before STATE and END)
    target = np.full_like(ram, 0x55)
    with pytest.raises(MigrationError, match="MEMORY_RUNS section checksum mismatch"):
        receive_memory_and_state(StreamReader(Pipe(bytes(stream))), [(0, target)])
    assert (target == 0x55).all()


def test_a_chunk_nobody_reads_still_has_its_crc_checked():
    ram = ram_with("plain")
    good = stream_of(ram)
    reader = StreamReader(Pipe(good))
    kinds = [section.kind for section in reader]           # nothing read into RAM
    assert kinds.count(SectionKind.MEMORY_RUNS) == 1 and reader.finished
    bad = bytearray(good)
    bad[len(good) // 2] ^= 0x10
    with pytest.raises(MigrationError, match="checksum mismatch"):
        list(StreamReader(Pipe(bytes(bad))))


def test_over_a_socket_pair():
    """As the destination reads: a socket's file object, the writer on another thread."""
    ram = ram_with("holes")
    data = stream_of(ram) + b""
    ours, theirs = socket.socketpair()
    sender = threading.Thread(target=lambda: (theirs.sendall(data), theirs.close()))
    sender.start()
    try:
        ours.settimeout(30)
        target = np.zeros_like(ram)
        with ours.makefile("rb") as stream:
            receive_memory_and_state(StreamReader(stream), [(0, target)])
        assert np.array_equal(target, ram)
    finally:
        sender.join(30)
        ours.close()
