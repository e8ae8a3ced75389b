"""SYNC: where the destination's ACCEPT offers it, the source ends every pass with a SYNC section
and waits for SYNCED, so the switchover starts with the destination caught up (bench-migrate's
idle guest spent most of its 800 ms downtime on megabytes still in the socket buffers). Passes
are driven per sync (PassDrivenGuest), never by how fast this host runs threads."""
from __future__ import annotations

import hashlib
import socket
import struct

import pytest

from kvmpy.errors import MigrationError
from kvmpy.memslots import GuestMemory
from kvmpy.migrate.codec import encode_state
from kvmpy.migrate.decoder import decode_state
from kvmpy.migrate.precopy import (ACCEPT, GO, LOADED, OFFER_SYNC, SOURCE_DOWNTIME_LOGGED, SYNCED, Channel,
                                   Precopy, receive_memory_and_state)
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import SYNC_PAYLOAD, SectionKind, StreamWriter

from test_migrate_precopy import RAM, Destination, FakeSource

PAGE = 4096


class SyncingDestination(Destination):
    """kvmpy.migrate.live's answers with SYNC offered; records the kinds of sections it read.
    `answer`: what it says to a SYNC."""

    def __init__(self, sock: socket.socket, answer: bytes = SYNCED):
        super().__init__(sock)
        self.answer = answer
        self.kinds: list[SectionKind] = []

    def _run(self) -> None:
        f = self.sock.makefile("rb")
        reader = StreamReader(f)
        original = reader.next_section

        def recording():
            section = original()
            if section is not None:
                self.kinds.append(section.kind)
            return section
        reader.next_section = recording
        assert reader.next_section().kind is SectionKind.CONFIG
        self.sock.sendall(ACCEPT + b" " + OFFER_SYNC.encode() + b"\n")
        payload = receive_memory_and_state(reader, [(0, self.memory.buffer(0, RAM))],
                                           on_sync=lambda: self.sock.sendall(self.answer + b"\n"))
        self.state = decode_state(payload)
        self.ram = hashlib.sha256(self.memory.buffer(0, RAM)).hexdigest()
        self.sock.sendall(LOADED + b"\n")
        self.go = f.readline(64) == GO + b"\n"


def run(dest_answer: bytes = SYNCED):
    a, b = socket.socketpair()
    source = FakeSource(0, per_sync=40, syncs=3)     # 40 pages before each of 3 syncs, then none
    dest = SyncingDestination(b, dest_answer)
    dest.start()
    # downtime-limit 0: only an empty dirty set switches over, after exactly three passes
    engine = Precopy(source, Channel(a, io_timeout_s=5.0), {"downtime-limit": 0, "max-bandwidth": 0},
                     reply_timeout_s=10.0)
    error = None
    try:
        engine.run()
    except MigrationError as e:
        error = e
    finally:
        a.close()
    dest.join(10)
    assert not dest.is_alive()
    return source, dest, engine, error


def test_every_pass_ends_with_a_sync_the_destination_answers():
    source, dest, engine, error = run()
    try:
        assert error is None and dest.error is None
        assert dest.ram == source.ram_at_switchover and dest.go
        assert engine.stats()["ram"]["dirty-sync-count"] == 3
        assert dest.kinds.count(SectionKind.SYNC) == 4     # after the first pass and each dirty pass
        last_sync = max(i for i, k in enumerate(dest.kinds) if k is SectionKind.SYNC)
        # after the last SYNC only the paused guest's last pages and its state: no SYNC in the downtime
        assert set(dest.kinds[last_sync + 1:]) <= {SectionKind.MEMORY_RUNS, SectionKind.STATE}
        assert dest.kinds[-1] is SectionKind.STATE
    finally:
        source.close()


def test_a_destination_that_answers_a_sync_wrongly_fails_the_migration_and_the_source_runs_on():
    source, dest, engine, error = run(dest_answer=b"KVMPY-WHAT")
    try:
        assert isinstance(error, MigrationError) and "instead of SYNCED" in str(error)
        assert not source.completed_ and source.resumes == 0 and not source.paused
        assert engine.stats()["status"] == "failed"
    finally:
        source.close()


def test_no_sync_without_the_offer():
    """The lead's Destination accepts without "sync": the stream has no SYNC (else it fails)."""
    from test_migrate_precopy import migrate
    source, dest, engine, error = migrate(rate=0, per_sync=40, syncs=2, params={"downtime-limit": 0, "max-bandwidth": 0})
    try:
        assert error is None and dest.error is None and dest.go
    finally:
        source.close()


def stream_with(sections) -> StreamReader:
    import io
    out = io.BytesIO()
    writer = StreamWriter(out, sparse=False)
    writer.write_header()
    for write in sections:
        write(writer)
    writer.finish()
    out.seek(0)

    class Pipe(io.BufferedReader):      # a pipe, not a seekable file
        def seekable(self):
            return False
    return StreamReader(Pipe(io.BytesIO(out.getvalue())))


def test_a_sync_section_round_trips_and_nobody_taking_it_is_an_error():
    reader = stream_with([lambda w: w.write_sync(7), lambda w: w.write_section(SectionKind.STATE, encode_state(1))])
    section = reader.next_section()
    assert section.kind is SectionKind.SYNC and SYNC_PAYLOAD.unpack(section.payload) == (7,)
    reader = stream_with([lambda w: w.write_sync(1), lambda w: w.write_section(SectionKind.STATE, encode_state(1))])
    with pytest.raises(MigrationError, match="unexpected SYNC section"):
        receive_memory_and_state(reader, [])
    synced: list[int] = []
    reader = stream_with([lambda w: w.write_sync(1), lambda w: w.write_section(SectionKind.STATE, encode_state(1))])
    assert decode_state(receive_memory_and_state(reader, [], on_sync=lambda: synced.append(1))) == 1
    assert synced == [1]


def test_an_oversized_sync_section_is_refused():
    import io
    import zlib
    from kvmpy.migrate.stream import FILE_HEADER, FILE_HEADER_CRC, FORMAT_VERSION, MAGIC, SECTION_HEADER, section_crc
    header = FILE_HEADER.pack(MAGIC, FORMAT_VERSION, 0)
    payload = bytes(16)
    raw = header + FILE_HEADER_CRC.pack(zlib.crc32(header)) + SECTION_HEADER.pack(
        SectionKind.SYNC, b"\0\0\0", section_crc(SectionKind.SYNC, len(payload), [payload]), len(payload)) + payload
    reader = StreamReader(io.BufferedReader(io.BytesIO(raw)))
    with pytest.raises(MigrationError, match="SYNC section of 16 bytes exceeds"):
        reader.next_section()


def test_pages_known_nonzero_go_as_data_without_a_second_scan():
    """The first pass scanned them; a page zeroed since is still sent (as data), never lost."""
    memory = GuestMemory.create(1 << 20)
    try:
        memory.write(0, b"\x01" * PAGE)             # page 0 data, page 1 zero by now, page 2 data
        memory.write(2 * PAGE, b"\x02" * PAGE)
        buffer = memory.buffer(0, 1 << 20)
        reader = stream_with([lambda w: w.write_pages(0, buffer, [(0, 3)], nonzero=True)])
        section = reader.next_section()
        target = GuestMemory.create(1 << 20)
        try:
            target.write(PAGE, b"\xff" * PAGE)      # stale: must become the (zero) page sent
            reader.read_memory_into(section, [(0, target.buffer(0, 1 << 20))])
            assert target.read(0, 3 * PAGE) == memory.read(0, 3 * PAGE)
        finally:
            target.close()
        assert struct.calcsize("<Q") == SYNC_PAYLOAD.size
    finally:
        memory.close()


# -- one more pass while it shrinks the dirty set by a quarter -----------------------------------
def test_worth_another_pass_while_the_dirty_set_shrinks_by_a_quarter():
    from kvmpy.migrate.converge import SWITCH_PAGES, worth_another_pass
    assert worth_another_pass(400, 1300) and worth_another_pass(150, 400)
    assert worth_another_pass(3285, 4642)                   # 0.71 (L1, 32 MiB rewritten): once left undone
    assert worth_another_pass(750, 1000) and not worth_another_pass(751, 1000)
    assert not worth_another_pass(3783, 3849)               # stopped shrinking: the working set
    assert not worth_another_pass(SWITCH_PAGES, 10 ** 6)    # tiny: goes at the switchover


@pytest.mark.parametrize("start", [10 ** 6, 300, 65])
def test_passes_worth_doing_are_bounded(start):
    import math
    from kvmpy.migrate.converge import SHRINK_DENOMINATOR, SHRINK_NUMERATOR, worth_another_pass
    left, previous, passes = start, 10 ** 7, 0
    while worth_another_pass(left, previous):   # the most passes: every one shrinks just enough
        previous, left, passes = left, left * SHRINK_NUMERATOR // SHRINK_DENOMINATOR, passes + 1
    assert passes <= 1 + math.log(start, SHRINK_DENOMINATOR / SHRINK_NUMERATOR)


class ScriptedGuest:
    """Wraps a tracker: before each sync the 'guest' dirties the next scripted number of distinct
    pages (through kvmpy's own writes), then none."""

    def __init__(self, source, script):
        self.source, self.script, self.inner = source, list(script), source.tracker

    def sync(self) -> int:
        if self.script and not self.source.paused:
            for page in range(self.script.pop(0)):
                self.source.memory.write(page * PAGE, b"dirty %d" % len(self.script))
        return self.inner.sync()

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_fitting_dirty_set_gets_more_passes_while_they_shrink_it():
    a, b = socket.socketpair()
    source = FakeSource(0)
    for page in range(100, 1000):                   # a first pass of ~900 pages
        source.memory.write(page * PAGE, b"data %d" % page)
    source.tracker = ScriptedGuest(source, [400, 150, 120])
    dest = SyncingDestination(b)
    dest.start()
    # everything fits 10^6 ms: only the shrinking rule makes passes
    engine = Precopy(source, Channel(a, io_timeout_s=5.0), {"downtime-limit": 10 ** 6, "max-bandwidth": 0},
                     reply_timeout_s=10.0)
    try:
        stats = engine.run()
        dest.join(10)
        assert dest.error is None and dest.ram == source.ram_at_switchover
        # 400 <= 900*3/4: a pass; 150 <= 400*3/4: a pass; 120 > 150*3/4: switch with those 120
        assert stats["ram"]["dirty-sync-count"] == 2
    finally:
        a.close()
        source.close()


class StateWritingSource(FakeSource):
    """A source whose last dirty set spans several switchover chunks, and whose state capture
    writes guest RAM itself (through GuestMemory: kvmpy's own write, a userspace mark)."""

    def pause(self) -> None:
        for page in range(0, 900):              # dirtied just before the pause: 4 switchover chunks
            self.memory.write(page * PAGE, b"late %d" % page)
        super().pause()

    def state(self) -> bytes:
        self.memory.write(1000 * PAGE, b"written by the state's capture")
        self.ram_at_switchover = hashlib.sha256(self.memory.buffer(0, RAM)).hexdigest()
        return super().state()


def test_the_state_goes_before_the_last_pages_and_what_its_capture_wrote_arrives(caplog):
    caplog.set_level("INFO", logger="kvmpy.migrate.precopy")
    a, b = socket.socketpair()
    source = StateWritingSource(0, per_sync=40, syncs=1)
    dest = SyncingDestination(b)
    dest.start()
    engine = Precopy(source, Channel(a, io_timeout_s=5.0), {"downtime-limit": 10 ** 6, "max-bandwidth": 0},
                     reply_timeout_s=10.0)
    try:
        engine.run()
        dest.join(10)
        assert dest.error is None and dest.go
        assert dest.ram == source.ram_at_switchover     # the capture's own write included
        last_sync = max(i for i, k in enumerate(dest.kinds) if k is SectionKind.SYNC)
        tail = dest.kinds[last_sync + 1:]
        assert tail[0] is SectionKind.STATE and set(tail[1:]) == {SectionKind.MEMORY_RUNS}
        assert len(tail) - 1 >= 900 // 256
        # bench-migrate reads the source's part of the downtime from the log
        [done] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("migrated:")]
        assert SOURCE_DOWNTIME_LOGGED.search(done.encode()), done
    finally:
        a.close()
        source.close()
