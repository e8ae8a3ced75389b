"""The pre-copy engine without /dev/kvm: a fake source (real GuestMemory, a fake KVM log, a
thread that keeps dirtying pages as a guest would) and a destination on the other end of a
socketpair. RAM at switchover arrives byte for byte; every failure before the destination's
confirmation leaves the source running; the arithmetic of convergence; hostile streams."""
from __future__ import annotations

import hashlib
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.errors import MigrationError
from kvmpy.memslots import GuestMemory
from kvmpy.memslots.dirty import DirtyTracker
from kvmpy.migrate import precopy
from kvmpy.migrate.codec import encode_state
from kvmpy.migrate.decoder import decode_state
from kvmpy.migrate.precopy import (ACCEPT, FAILED, GO, LOADED, REFUSE, Cancelled, Channel, Precopy,
                                   converged, expected_downtime_ms, receive_memory_and_state)
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import SectionKind

from test_migrate_precopy_dirty import FakeVm

PAGE = 4096
RAM = 4 << 20


# -- arithmetic ------------------------------------------------------------------------------------
def test_expected_downtime_and_convergence():
    assert expected_downtime_ms(0, 0) == 0 and converged(0, 0, 300)
    assert expected_downtime_ms(256, 1 << 20) == pytest.approx(1000.0)     # 1 MiB at 1 MiB/s
    assert converged(76, 1 << 20, 300) and not converged(77, 1 << 20, 300)  # 300 ms of 1 MiB/s
    assert not converged(1, 0, 300)                                          # nothing measured yet


@given(st.integers(0, 1 << 24), st.floats(1.0, 1e11), st.floats(1.0, 1e5))
def test_convergence_is_monotonic(pages, bandwidth, limit):
    if converged(pages, bandwidth, limit):
        assert converged(pages // 2, bandwidth, limit) and converged(pages, bandwidth * 2, limit)
        assert converged(pages, bandwidth, limit * 2)


# -- fakes -----------------------------------------------------------------------------------------
class PassDrivenGuest(DirtyTracker):
    """A guest that dirties `per_sync` pages (fewer as auto-converge throttles it) between two of
    the engine's syncs, for the first `syncs` of them, instead of in real time. Whether passes
    converge then follows from the arithmetic alone: a loaded CI host that starved the real-time
    thread made 'never converges' converge (and the reverse)."""

    def __init__(self, source: "FakeSource", per_sync: int, syncs: int | None):
        super().__init__(source.memory, source.vm)
        self.source, self.per_sync, self.syncs_left = source, per_sync, syncs
        self.rng = np.random.default_rng(7)
        self.hot = self.rng.choice(RAM // PAGE, 64, replace=False)
        self.n = 0

    def sync(self) -> int:
        if not self.source.paused and (self.syncs_left is None or self.syncs_left > 0):
            for _ in range(self.per_sync * (100 - self.source.throttled) // 100):
                self.source.dirty_one(self.rng, self.hot, self.n)
                self.n += 1
            if self.syncs_left is not None:
                self.syncs_left -= 1
        return super().sync()


class FakeSource:
    """A 'guest' thread that dirties pages (through KVM's log and through kvmpy's own writes)
    while running; pause() stops it and fingerprints RAM as the switchover sees it."""

    def __init__(self, dirty_pages_per_ms: int = 4, manual: bool = True, burst_s: float | None = None,
                 text_pages: int = 0, per_sync: int = 0, syncs: int | None = None):
        self.memory = GuestMemory.create(RAM)
        self.vm = FakeVm(self.memory, manual)
        self.tracker = DirtyTracker(self.memory, self.vm)
        self.rate = dirty_pages_per_ms
        if per_sync:        # convergence that does not depend on how fast this host runs threads
            self.tracker = PassDrivenGuest(self, per_sync, syncs)
        self.burst_until = None if burst_s is None else time.monotonic() + burst_s
        self.throttled = 0                  # auto-converge's percentage, as the vCPUs feel it
        self.throttle_calls: list[int] = []
        self.events: list[tuple[str, dict]] = []
        self.paused = self.completed_ = False
        self.resumes = 0
        self.ram_at_switchover: str | None = None
        rng = np.random.default_rng(1)
        for page in rng.choice(RAM // PAGE, 300, replace=False):     # some data to begin with
            self.memory.write(int(page) * PAGE, rng.bytes(PAGE))
        for page in range(text_pages):                                # and some that compress
            self.memory.write((RAM // 2) + page * PAGE, (b"kvmpy %06d " % page) * (PAGE // 13) + b"\n" * (PAGE % 13))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start_guest()

    def _start_guest(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._guest, daemon=True)
        self._thread.start()

    def _guest(self) -> None:
        rng = np.random.default_rng()
        hot = rng.choice(RAM // PAGE, 64, replace=False)
        n = 0
        budget = 0.0
        while not self._stop.is_set():
            if self.burst_until is not None and time.monotonic() > self.burst_until:
                time.sleep(0.001)       # idle now: the dirty set drains
                continue
            budget += self.rate * (100 - self.throttled) / 100
            while budget >= 1:
                budget -= 1
                self.dirty_one(rng, hot, n)
                n += 1
            time.sleep(0.001)

    def dirty_one(self, rng: np.random.Generator, hot: np.ndarray, n: int) -> None:
        """One guest write: a hot page two times in three, half through KVM's log, half through
        kvmpy's own writes; every eleventh page turns zero."""
        page = int(hot[n % len(hot)]) if n % 3 else int(rng.integers(RAM // PAGE))
        value = bytes(PAGE) if n % 11 == 0 else rng.bytes(16)
        if n % 2:
            self.vm.guest_write(page * PAGE + (0 if len(value) == PAGE else 64), value)
        else:
            self.memory.write(page * PAGE, value)

    def throttle(self, percent: int) -> None:
        self.throttled = percent
        self.throttle_calls.append(percent)

    def identity(self) -> bytes:
        return encode_state({"memory": RAM})

    def pause(self) -> None:
        self._stop.set()
        self._thread.join()
        self.paused = True
        self.ram_at_switchover = hashlib.sha256(self.memory.buffer(0, RAM)).hexdigest()

    def resume(self) -> None:
        self.paused = False
        self.resumes += 1
        self._start_guest()

    def state(self) -> bytes:
        return encode_state({"cpu": "registers"})

    def completed(self) -> None:
        self.completed_ = True

    def check(self) -> None:
        pass

    def emit(self, event: str, data: dict) -> None:
        self.events.append((event, data))

    @property
    def running(self) -> bool:
        return not self._stop.is_set()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.memory.close()


class Destination(threading.Thread):
    """The far end: answers as kvmpy.migrate.live does; `behaviour` chooses how it misbehaves."""

    def __init__(self, sock: socket.socket, behaviour: str = "good", stop_after: int = 0):
        super().__init__(daemon=True)
        self.sock, self.behaviour, self.stop_after = sock, behaviour, stop_after
        self.memory = GuestMemory.create(RAM)
        self.ram: str | None = None
        self.state = None
        self.go = False
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:       # recorded for the test; a dead peer is the point of some
            self.error = e
        finally:
            self.sock.close()

    def _run(self) -> None:
        f = self.sock.makefile("rb")
        reader = StreamReader(f)
        section = reader.next_section()
        assert section.kind is SectionKind.CONFIG and decode_state(section.payload) == {"memory": RAM}
        if self.behaviour == "refuse":
            self.sock.sendall(REFUSE + b" it has 4 MiB of RAM, this machine 8 MiB (-m)\n")
            return
        self.sock.sendall(ACCEPT + b"\n")
        if self.behaviour == "stop":           # a peer that dies after stop_after bytes
            got = 0
            while got < self.stop_after:
                data = f.read1(65536)
                if not data:
                    return
                got += len(data)
            self.sock.shutdown(socket.SHUT_RDWR)
            return
        if self.behaviour == "stall":          # takes nothing more, never answers
            time.sleep(3)
            return
        payload = receive_memory_and_state(reader, [(0, self.memory.buffer(0, RAM))])
        self.state = decode_state(payload)
        self.ram = hashlib.sha256(self.memory.buffer(0, RAM)).hexdigest()
        if self.behaviour == "fail-load":
            self.sock.sendall(FAILED + b" restoring vCPUs: nope\n")
            return
        self.sock.sendall(LOADED + b"\n")
        self.go = f.readline(64) == GO + b"\n"


def migrate(behaviour="good", params=None, rate=4, manual=True, stop_after=0, cancel_after=None,
            reply_timeout_s=10.0, burst_s=None, capabilities=None, text_pages=0, per_sync=0, syncs=None):
    a, b = socket.socketpair()
    source = FakeSource(rate, manual, burst_s, text_pages, per_sync, syncs)
    dest = Destination(b, behaviour, stop_after)
    dest.start()
    engine = Precopy(source, Channel(a, io_timeout_s=2.0), params or {"downtime-limit": 300, "max-bandwidth": 0},
                     reply_timeout_s=reply_timeout_s, capabilities=capabilities)
    if cancel_after is not None:
        threading.Timer(cancel_after, engine.cancel).start()
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


# -- the engine ------------------------------------------------------------------------------------
@pytest.mark.parametrize("manual", [True, False])
def test_ram_arrives_byte_identical_and_only_then_the_source_stops(manual):
    source, dest, engine, error = migrate(manual=manual)
    try:
        assert error is None and dest.error is None
        assert dest.ram == source.ram_at_switchover and dest.state == {"cpu": "registers"}
        assert dest.go and source.completed_ and source.paused and source.resumes == 0
        stats = engine.stats()
        assert stats["status"] == "completed" and stats["ram"]["remaining"] == 0
        assert stats["ram"]["total"] == RAM and stats["ram"]["transferred"] > 300 * PAGE
        assert stats["downtime"] >= 0 and stats["total-time"] >= stats["setup-time"]
        statuses = [d["status"] for e, d in source.events if e == "MIGRATION"]
        assert statuses == ["setup", "active", "device", "completed"]
        passes = [d["pass"] for e, d in source.events if e == "MIGRATION_PASS"]
        assert passes == list(range(1, stats["ram"]["dirty-sync-count"] + 1))
        assert not source.tracker.active and not source.memory.tracking
    finally:
        source.close()


def test_a_tight_downtime_limit_takes_more_passes_until_it_fits():
    """A guest dirtying 200 pages between each of the first three syncs, then idle, behind a
    4 MiB/s link: its dirty set does not fit 5 ms (5 pages), so passes follow until it drains."""
    source, dest, engine, error = migrate(params={"downtime-limit": 5, "max-bandwidth": 4 << 20}, rate=0,
                                          per_sync=200, syncs=3)
    try:
        assert error is None and dest.ram == source.ram_at_switchover
        stats = engine.stats()
        assert stats["ram"]["dirty-sync-count"] >= 2 and stats["expected-downtime"] <= 5
    finally:
        source.close()


AUTO_CONVERGE = {"downtime-limit": 2, "max-bandwidth": 16 << 20, "cpu-throttle-initial": 50,
                 "cpu-throttle-increment": 20}


def test_auto_converge_throttles_a_guest_that_outruns_the_link():
    """600 pages a pass never fit 2 ms of 16 MiB/s (8 pages); throttled step by step to 99 %
    (6 pages a pass), they do."""
    source, dest, engine, error = migrate(params=AUTO_CONVERGE, rate=0, per_sync=600,
                                          capabilities={"auto-converge": True})
    try:
        assert error is None and dest.ram == source.ram_at_switchover
        assert source.throttle_calls == [50, 70, 90, 99, 0]
        assert source.throttled == 0            # released before the switchover
    finally:
        source.close()


def test_without_auto_converge_it_does_not_converge_and_cancel_ends_it():
    source, dest, engine, error = migrate(params=AUTO_CONVERGE, rate=0, per_sync=600, cancel_after=2.0)
    try:
        assert isinstance(error, Cancelled) and engine.passes >= 3 and source.throttle_calls == []
        assert source.running and not source.completed_
    finally:
        source.close()


def test_throttle_steps():
    assert [precopy.next_throttle(c, {}) for c in (0, 20, 90, 99)] == [20, 30, 99, 99]
    assert precopy.next_throttle(0, {"cpu-throttle-initial": 5, "max-cpu-throttle": 3}) == 3
    assert precopy.dirtied_faster_than_sent(51, 100, {}) and not precopy.dirtied_faster_than_sent(50, 100, {})


def test_max_bandwidth_is_respected():
    started = time.monotonic()
    source, dest, engine, error = migrate(params={"downtime-limit": 300, "max-bandwidth": 4 << 20}, rate=1)
    try:
        assert error is None
        # everything before the switchover went at most at 4 MiB/s (the switchover is unthrottled)
        stats = engine.stats()
        assert stats["ram"]["transferred"] > 1 << 20
        assert time.monotonic() - started >= 0.8 * (stats["ram"]["transferred"] - 64 * PAGE) / (4 << 20)
    finally:
        source.close()


@pytest.mark.parametrize("behaviour,needle", [
    ("refuse", "refused.*4 MiB"),
    ("stop", "connection|closed|Broken|reset"),
    ("fail-load", "could not load.*nope"),
])
def test_any_failure_before_the_confirmation_keeps_the_source_running(behaviour, needle):
    source, dest, engine, error = migrate(behaviour, stop_after=200_000)
    try:
        assert error is not None and __import__("re").search(needle, str(error)), error
        assert source.running and not source.completed_ and not source.paused
        assert engine.stats()["status"] == "failed" and engine.stats()["error-desc"]
        assert not source.tracker.active and not source.memory.tracking
        assert not dest.go
    finally:
        source.close()


@given(st.integers(0, 1_400_000))
@settings(max_examples=8, deadline=None)
def test_a_peer_that_stops_anywhere_leaves_the_source_running(stop_after):
    """The destination reads `stop_after` bytes of the stream (anywhere in the first pass, the
    later ones or the switchover) and hangs up: one MigrationError, the source runs on."""
    source, dest, engine, error = migrate("stop", stop_after=stop_after)
    try:
        assert isinstance(error, MigrationError) and not isinstance(error, Cancelled)
        assert source.running and not source.completed_ and not source.paused
        assert engine.stats()["status"] == "failed" and not dest.go
    finally:
        source.close()


def test_a_destination_that_takes_nothing_times_out_and_the_source_runs_on():
    source, dest, engine, error = migrate("stall", reply_timeout_s=1.0)
    try:
        assert error is not None and source.running and not source.completed_
    finally:
        source.close()


def test_cancel_resumes_the_source():
    source, dest, engine, error = migrate(params={"downtime-limit": 300, "max-bandwidth": 256 << 10},
                                          cancel_after=0.3)
    try:
        assert isinstance(error, Cancelled)
        assert engine.stats()["status"] == "cancelled" and "error-desc" not in engine.stats()
        assert source.running and not source.completed_
        assert [d["status"] for e, d in source.events if e == "MIGRATION"][-2:] == ["cancelling", "cancelled"]
    finally:
        source.close()


# -- the destination's side of the stream ------------------------------------------------------------
def _record_stream() -> bytes:
    """A complete live stream (pages while dirtying, state, END) as bytes, GO included."""
    a, b = socket.socketpair()
    source = FakeSource(2)
    chunks: list[bytes] = []

    def far_end():
        f = b.makefile("rb")
        reader = StreamReader(f)
        reader.next_section()
        b.sendall(ACCEPT + b"\n")
        with GuestMemory.create(RAM) as m:
            receive_memory_and_state(reader, [(0, m.buffer(0, RAM))])
        b.sendall(LOADED + b"\n")
    # tee what the source sends: wrap the channel's socket send
    channel = Channel(a)
    original = channel.write

    def tee(data):
        chunks.append(bytes(memoryview(data).cast("B")))
        return original(data)
    channel.write = tee
    t = threading.Thread(target=far_end, daemon=True)
    t.start()
    try:
        Precopy(source, channel, {"downtime-limit": 300, "max-bandwidth": 0}).run()
    finally:
        t.join(10)
        a.close()
        b.close()
        source.close()
    return b"".join(chunks)


@pytest.fixture(scope="module")
def live_stream() -> bytes:
    return _record_stream()


def _read_after_config(data: bytes):
    import io
    reader = StreamReader(io.BufferedReader(io.BytesIO(data)))
    reader.next_section()
    with GuestMemory.create(RAM) as m:
        return receive_memory_and_state(reader, [(0, m.buffer(0, RAM))])


def test_recorded_stream_reads_back(live_stream):
    assert decode_state(_read_after_config(live_stream)) == {"cpu": "registers"}


@given(st.data())
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_mutated_live_streams_are_one_migration_error(live_stream, data):
    stream = bytearray(live_stream)
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(stream) - 1))
            stream[i] ^= data.draw(st.integers(1, 255))
    elif how == "truncate":
        stream = stream[:data.draw(st.integers(0, len(stream) - 1))]
    else:
        i = data.draw(st.integers(0, len(stream)))
        stream[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    try:
        _read_after_config(bytes(stream))
    except MigrationError:
        pass                      # refused in one line; anything else (a crash) fails the test


def test_the_last_pages_may_follow_the_state_but_not_a_second_state_or_a_sync(live_stream):
    """The switchover sends STATE before its last pages (they travel while the destination
    loads it): they still land, on_state hears the state before them; a second STATE or a SYNC
    after it is refused, and so is a stream without one."""
    import io
    from kvmpy.migrate.reader import StreamReader
    from kvmpy.migrate.stream import StreamWriter

    def stream(*after_state) -> bytes:
        out = io.BytesIO()
        w = StreamWriter(out, sparse=False)
        w.write_header()
        w.write_section(SectionKind.CONFIG, encode_state({"memory": RAM}))
        w.write_section(SectionKind.STATE, encode_state({"cpu": 1}))
        for write in after_state:
            write(w)
        w.finish()
        return out.getvalue()

    ram = bytearray(RAM)
    ram[5 * 4096 + 9] = 0x5A
    data = stream(lambda w: w.write_pages(0, ram, [(5, 1)]))
    reader = StreamReader(io.BufferedReader(io.BytesIO(data)))
    reader.next_section()
    heard = []
    with GuestMemory.create(RAM) as m:
        buffer = m.buffer(0, RAM)
        payload = receive_memory_and_state(reader, [(0, buffer)],
                                           on_state=lambda p: heard.append((decode_state(p), bytes(buffer[5 * 4096 + 9:5 * 4096 + 10]))))
        assert bytes(buffer[5 * 4096 + 9:5 * 4096 + 10]) == b"\x5a"
    assert decode_state(payload) == {"cpu": 1} and heard == [({"cpu": 1}, b"\0")]    # heard before the page
    with pytest.raises(MigrationError, match="unexpected STATE"):
        _read_after_config(stream(lambda w: w.write_section(SectionKind.STATE, encode_state({}))))
    reader = StreamReader(io.BufferedReader(io.BytesIO(stream(lambda w: w.write_sync(1)))))
    reader.next_section()
    with pytest.raises(MigrationError, match="unexpected SYNC"):        # even where SYNC is taken
        receive_memory_and_state(reader, [], on_sync=lambda: None)
    out = io.BytesIO()
    w = StreamWriter(out, sparse=False)
    w.write_header()
    w.write_section(SectionKind.CONFIG, encode_state({"memory": RAM}))
    w.finish()
    with pytest.raises(MigrationError, match="state is missing"):
        _read_after_config(out.getvalue())


# -- compress (zstd) -------------------------------------------------------------------------------
def test_compressed_migration_is_identical_and_smaller():
    # an idle guest (rate 0) sends the same pages both times, so the sizes compare exactly: 300
    # random pages (incompressible, and zstd must not make them bigger than their frames allow)
    # and 200 pages of text (compress well). A dirtying guest made the comparison a coin toss
    # (CI: 1243275 < 1242949 failed) because each run sent a different set of pages.
    plain = migrate(rate=0, text_pages=200)
    packed = migrate(rate=0, text_pages=200, capabilities={"compress": True})
    try:
        for source, dest, engine, error in (plain, packed):
            assert error is None and dest.ram == source.ram_at_switchover
        sent = [run[2].stats()["ram"]["transferred"] for run in (plain, packed)]
        assert sent[0] > 400 * PAGE and sent[1] < sent[0] - 150 * PAGE, sent
    finally:
        plain[0].close()
        packed[0].close()


def _compressed_stream() -> bytes:
    import io
    from kvmpy.migrate.stream import StreamWriter
    out = io.BytesIO()
    w = StreamWriter(out, sparse=False)
    w.compress = True
    w.write_header()
    w.write_section(SectionKind.CONFIG, encode_state({"memory": RAM}))
    ram = bytearray(RAM)
    for page in range(0, RAM // PAGE, 7):
        ram[page * PAGE:page * PAGE + 100] = bytes([page & 0xFF]) * 100
    w.write_pages(0, ram, [(0, RAM // PAGE)])
    w.write_section(SectionKind.STATE, encode_state({"cpu": 1}))
    w.finish()
    return out.getvalue(), bytes(ram)


def test_compressed_chunks_read_back():
    import io
    data, ram = _compressed_stream()
    assert bytes([SectionKind.MEMORY_ZSTD]) in data and len(data) < len(ram) // 20
    reader = StreamReader(io.BufferedReader(io.BytesIO(data)))
    reader.next_section()
    with GuestMemory.create(RAM) as m:
        m.fill(0, RAM, 0xAA)                # zero runs must clear what was there
        assert decode_state(receive_memory_and_state(reader, [(0, m.buffer(0, RAM))])) == {"cpu": 1}
        assert bytes(m.buffer(0, RAM)) == ram


@given(st.data())
@settings(max_examples=80, deadline=None)
def test_mutated_compressed_streams_are_one_migration_error(data):
    """Flips inside zstd frames (with the section crc fixed up, so the frame itself is what the
    reader must survive) and plain flips/truncations: a MigrationError or a correct read."""
    import struct
    import zlib
    from kvmpy.migrate.stream import SECTION_HEADER, SECTION_CRC_FIELDS
    raw, _ = _compressed_stream()
    stream = bytearray(raw)
    # find the sections: (offset, kind, length)
    sections, pos = [], 20
    while pos < len(stream):
        kind, _, _, length = SECTION_HEADER.unpack_from(stream, pos)
        sections.append((pos, kind, length))
        pos += SECTION_HEADER.size + length
    zsections = [s for s in sections if s[1] == SectionKind.MEMORY_ZSTD]
    pos, kind, length = data.draw(st.sampled_from(zsections))
    payload_at = pos + SECTION_HEADER.size
    for _ in range(data.draw(st.integers(1, 3))):
        i = payload_at + data.draw(st.integers(0, length - 1))
        stream[i] ^= data.draw(st.integers(1, 255))
    if data.draw(st.booleans()):            # recompute the crc: only the frame is wrong now
        crc = zlib.crc32(SECTION_CRC_FIELDS.pack(kind, length))
        crc = zlib.crc32(bytes(stream[payload_at:payload_at + length]), crc)
        struct.pack_into("<I", stream, pos + 4, crc)
    try:
        _read_after_config(bytes(stream))
    except MigrationError:
        pass
