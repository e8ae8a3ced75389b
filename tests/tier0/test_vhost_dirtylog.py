"""vhost-net's dirty log without the kernel (kvmpy.vhost.dirtylog): the log's size and layout
against <linux/vhost.h>, bits -> pages across RAM ranges and the device hole, the atomic
take-and-clear on a log the "kernel" writes exactly as drivers/vhost/vhost.c's log_write does,
the ioctls VhostNetOffload.set_log issues (recorded by a fake VhostNet), DirtyTracker's extra-log
hook, and a pre-copy migration whose "kernel" writes guest RAM behind both other logs: RAM
arrives byte-identical with the log merged, and differs without it."""
from __future__ import annotations

import ctypes
import shutil
import socket
import subprocess
import threading

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.errors import DeviceError, IoctlError
from kvmpy.memslots import GuestMemory, ram_ranges
from kvmpy.memslots.dirty import DirtyTracker
from kvmpy.memslots.layout import GiB, MiB, RamRange
from kvmpy.migrate.precopy import Channel, Precopy
from kvmpy.vhost import net as vhostnet
from kvmpy.vhost.dirtylog import (VHOST_PAGE_SIZE, VHOST_VRING_F_LOG, VhostDirtyLog, VhostLogBuffer, log_pages,
                                  log_size, merge_log)
from kvmpy.vhost.net import VHOST_F_LOG_ALL, VHOST_NET_F_VIRTIO_NET_HDR, VhostNetOffload

from test_migrate_precopy_dirty import FakeVm
from support.fake_vhost import recording_vhost
from test_vhost_net import FakePath

PAGE = 4096
SMALL_HOLE = ram_ranges(4 * MiB, hole_start=2 * MiB)     # [0, 2 MiB) and [4 GiB, 4 GiB + 2 MiB)


def kernel_log_write(log_base: int, write_address: int, write_length: int) -> None:
    """drivers/vhost/vhost.c's log_write: one bit per VHOST_PAGE_SIZE page the write touches, bit
    page % 8 of the byte at log_base + page / 8 (the kernel's set_bit; no Python in between)."""
    if not write_length:
        return
    page = write_address // VHOST_PAGE_SIZE
    write_length += write_address % VHOST_PAGE_SIZE
    while True:
        byte = ctypes.c_uint8.from_address(log_base + page // 8)
        byte.value |= 1 << (page % 8)
        if write_length <= VHOST_PAGE_SIZE:
            break
        write_length -= VHOST_PAGE_SIZE
        page += 1


# -- the ABI --------------------------------------------------------------------------------------
def test_constants_match_the_headers(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    src = tmp_path / "c.c"
    src.write_text("#include <stdio.h>\n#include <linux/vhost.h>\nint main(void) { printf(\"%d %d %d\\n\", "
                   "VHOST_PAGE_SIZE, VHOST_VRING_F_LOG, VHOST_F_LOG_ALL); return 0; }\n")
    subprocess.run(["gcc", "-o", str(tmp_path / "c"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "c")], check=True, capture_output=True, text=True).stdout.split()
    assert [int(v) for v in out] == [VHOST_PAGE_SIZE, VHOST_VRING_F_LOG, VHOST_F_LOG_ALL.bit_length() - 1]


# -- arithmetic -----------------------------------------------------------------------------------
def test_log_size_covers_guest_physical_space_in_whole_words():
    assert log_size(ram_ranges(512 * MiB)) == 512 * MiB // PAGE // 8 == 16384
    # 5 GiB: [0, 3 GiB) and [4 GiB, 6 GiB): the hole is in the log too (indexed by guest address)
    assert log_size(ram_ranges(5 * GiB)) == 6 * GiB // PAGE // 8
    assert log_size([RamRange(0, 0, 3 * PAGE, 0)]) == 8          # 3 bits: one u64 word
    assert log_size([RamRange(0, 0, 65 * PAGE, 0)]) == 16
    assert log_size([]) == 0


@given(st.lists(st.tuples(st.integers(0, 1 << 24), st.integers(1, 1 << 20)), min_size=1, max_size=4))
def test_log_size_is_the_tightest_word_multiple(pieces):
    ranges = [RamRange(i, gpa * PAGE, n * PAGE, 0) for i, (gpa, n) in enumerate(pieces)]
    size = log_size(ranges)
    last_page = max(r.gpa + r.size for r in ranges) // PAGE - 1
    assert size % 8 == 0 and size * 8 > last_page and (size - 8) * 8 <= last_page


def test_bit_i_of_byte_j_is_page_8j_plus_i():
    log = np.zeros(16, dtype=np.uint8)
    log[0], log[2], log[15] = 0b101, 0x80, 0x01
    assert log_pages(log).tolist() == [0, 2, 23, 120]
    assert log_pages(np.zeros(8, dtype=np.uint8)).tolist() == []


def test_merge_offsets_each_range_and_drops_the_hole():
    pending = [np.zeros(r.size // PAGE, dtype=bool) for r in SMALL_HOLE]
    log = np.zeros(log_size(SMALL_HOLE), dtype=np.uint8)
    high = 4 * GiB // PAGE
    for page in (3, 511, 512, 700_000, high, high + 511):       # 512 and 700000: in the hole
        log[page // 8] |= 1 << (page % 8)
    assert merge_log(log, SMALL_HOLE, pending) == 4
    assert np.flatnonzero(pending[0]).tolist() == [3, 511]
    assert np.flatnonzero(pending[1]).tolist() == [0, 511]


def test_merge_only_adds():
    pending = [np.zeros(512, dtype=bool)]
    pending[0][[1, 9]] = True
    log = np.zeros(64, dtype=np.uint8)
    log[0] = 0b100
    assert merge_log(log, [RamRange(0, 0, 2 * MiB, 0)], pending) == 1
    assert np.flatnonzero(pending[0]).tolist() == [1, 2, 9]


@given(st.sets(st.integers(0, 4 * GiB // PAGE + 511), max_size=40))
@settings(max_examples=100)
def test_merge_marks_exactly_the_ram_pages(pages):
    pending = [np.zeros(r.size // PAGE, dtype=bool) for r in SMALL_HOLE]
    log = np.zeros(log_size(SMALL_HOLE), dtype=np.uint8)
    for p in pages:
        log[p // 8] |= 1 << (p % 8)
    count = merge_log(log, SMALL_HOLE, pending)
    expected = {(i, p - r.gpa // PAGE) for p in pages for i, r in enumerate(SMALL_HOLE)
                if r.gpa // PAGE <= p < r.end // PAGE}
    got = {(i, int(p)) for i, marks in enumerate(pending) for p in np.flatnonzero(marks)}
    assert got == expected and count == len(expected)


# -- the log's memory -----------------------------------------------------------------------------
def test_take_returns_and_clears_what_the_kernel_logged():
    buf = VhostLogBuffer(log_size(SMALL_HOLE))
    try:
        assert buf.address % 4096 == 0
        kernel_log_write(buf.address, 0x3FF0, 0x20)              # straddles pages 3 and 4
        kernel_log_write(buf.address, 4 * GiB + 5 * PAGE, 1)
        first = buf.take()
        assert log_pages(first).tolist() == [3, 4, 4 * GiB // PAGE + 5]
        assert not buf.take().any()                             # cleared in the same step
        kernel_log_write(buf.address, 4 * PAGE, 8)              # again after the take: the next one has it
        assert log_pages(buf.take()).tolist() == [4]
    finally:
        buf.close()


@given(st.lists(st.lists(st.integers(0, 1023), max_size=12), max_size=12))
@settings(max_examples=50)
def test_interleaved_writes_and_takes_lose_nothing(rounds):
    """Every page logged between two takes is in the second one, and in no later one."""
    buf = VhostLogBuffer(log_size([RamRange(0, 0, 1024 * PAGE, 0)]))
    try:
        for pages in rounds:
            for p in pages:
                kernel_log_write(buf.address, p * PAGE + 17, 1)
            assert log_pages(buf.take()).tolist() == sorted(set(pages))
    finally:
        buf.close()


# -- the tracker's hook ---------------------------------------------------------------------------
class FakeOffload:
    def __init__(self, fail_on: int | None = None):
        self.calls: list[int | None] = []
        self.fail_on = fail_on

    def set_log(self, address):
        self.calls.append(address)
        if self.fail_on is not None and len(self.calls) == self.fail_on:
            raise IoctlError("VHOST_SET_FEATURES on /dev/vhost-net", errno=14)


def test_one_log_for_every_offload_taken_back_at_stop():
    a, b = FakeOffload(), FakeOffload()
    vlog = VhostDirtyLog([a, b], SMALL_HOLE)
    vlog.start()
    address = vlog.buffer.address
    assert a.calls == b.calls == [address]
    kernel_log_write(address, 4 * GiB + PAGE, 1)
    pending = [np.zeros(r.size // PAGE, dtype=bool) for r in SMALL_HOLE]
    assert vlog.take_into(pending) == 1 and np.flatnonzero(pending[1]).tolist() == [1]
    vlog.stop()
    assert a.calls == b.calls == [address, None] and vlog.buffer is None and vlog.pages_logged == 1
    assert vlog.take_into(pending) == 0                     # stopped: nothing to take


def test_a_failed_start_switches_the_others_off():
    a, b = FakeOffload(), FakeOffload(fail_on=1)
    vlog = VhostDirtyLog([a, b], SMALL_HOLE)
    with pytest.raises(IoctlError):
        vlog.start()
    assert a.calls[-1] is None and b.calls[-1] is None and vlog.buffer is None


def test_a_log_that_could_not_be_switched_off_stays_mapped(caplog):
    a = FakeOffload(fail_on=2)
    vlog = VhostDirtyLog([a], SMALL_HOLE)
    vlog.start()
    buffer = vlog.buffer
    vlog.stop()
    assert "switching vhost-net's dirty log off" in caplog.text
    assert buffer._map is not None      # the kernel may still write there: not handed back to mmap
    buffer.close()


class KernelLog:
    """An extra log standing for vhost: writes RAM behind GuestMemory's back, logs it, and
    records the order of the tracker's calls."""

    def __init__(self, memory: GuestMemory, events: list):
        self.memory, self.events = memory, events
        self.vlog = VhostDirtyLog([FakeOffload()], memory.ranges)

    def write(self, gpa: int, data: bytes) -> None:
        self.memory.buffer(gpa, len(data))[:] = data
        kernel_log_write(self.vlog.buffer.address, gpa, len(data))

    def start(self):
        self.events.append("start")
        self.vlog.start()

    def stop(self):
        self.events.append("stop")
        self.vlog.stop()

    def take_into(self, pending):
        self.events.append("take")
        return self.vlog.take_into(pending)


def test_tracker_merges_the_extra_log_until_stopped():
    with GuestMemory(SMALL_HOLE) as mem:
        vm, events = FakeVm(mem), []
        tracker = DirtyTracker(mem, vm)
        kernel = KernelLog(mem, events)
        tracker.extra_logs.append(kernel)
        tracker.start()
        assert events == ["start"] and all(flags for *_, flags in vm.regions)
        kernel.write(0x5000, b"rx frame")
        kernel.write(4 * GiB + 2 * PAGE - 2, b"used")      # straddles pages 1 and 2 of the high range
        assert tracker.sync() == 3
        assert tracker.sync() == 3                          # counting twice loses nothing
        assert np.flatnonzero(tracker.take(0, 0, 512)).tolist() == [5]
        kernel.write(0x5000, b"again")                      # after the take: dirty again
        assert tracker.sync() == 3
        assert np.flatnonzero(tracker.take(0, 0, 512)).tolist() == [5]
        assert np.flatnonzero(tracker.take(1, 0, 512)).tolist() == [1, 2]
        assert tracker.sync() == 0
        tracker.stop()
        assert events[-1] == "stop" and kernel.vlog.buffer is None and not mem.tracking


def test_tracker_start_failing_in_an_extra_log_leaves_nothing_on():
    class Broken:
        stopped = False

        def start(self):
            raise DeviceError("logging vhost-net's writes for the migration", detail="no VHOST_F_LOG_ALL")

        def stop(self):
            Broken.stopped = True

        def take_into(self, pending):
            return 0
    with GuestMemory.create(2 * MiB) as mem:
        vm = FakeVm(mem)
        tracker = DirtyTracker(mem, vm)
        tracker.extra_logs.append(Broken())
        with pytest.raises(DeviceError):
            tracker.start()
        assert Broken.stopped and not tracker.active and not mem.tracking and not vm.regions[-1][-1]


# -- VhostNetOffload.set_log ----------------------------------------------------------------------
FEATURES = (1 << 32) | (1 << 15) | (1 << 29) | VHOST_NET_F_VIRTIO_NET_HDR | VHOST_F_LOG_ALL


FakeVhost = recording_vhost(FEATURES, vring_base=lambda q: 0)


@pytest.fixture
def offload(monkeypatch):
    monkeypatch.setattr(vhostnet, "VhostNet", FakeVhost)
    FakeVhost.log, FakeVhost.features = [], FEATURES
    mem = GuestMemory.create(1 * MiB)
    off = VhostNetOffload([42])
    off.bind(FakePath(mem))
    queues = [Virtqueue(mem, i, 256, fast=False) for i in range(2)]
    for i, q in enumerate(queues):
        q.size = 256
        q.desc_addr, q.avail_addr, q.used_addr = 0x10000 * (i + 1), 0x10000 * (i + 1) + 0x1000, 0x10000 * (i + 1) + 0x2000
        q.activate()
    yield off, queues, mem
    off.stop()
    mem.close()


def ring_addr(mem, q, logging):
    h = mem.host_address(0)
    base = ("set_vring_addr", q.index, h + q.desc_addr, h + q.used_addr, h + q.avail_addr)
    return base + ((1 << VHOST_VRING_F_LOG, q.used_addr) if logging else ())


ACKED = (1 << 32) | (1 << 15)


def test_set_log_on_running_rings_then_off(offload):
    off, queues, mem = offload
    off.start(queues, ACKED | (1 << 5), 1)
    assert ("set_features", ACKED) in FakeVhost.log and ring_addr(mem, queues[0], False) in FakeVhost.log
    FakeVhost.log = []
    off.set_log(0x7F0000001000)
    assert FakeVhost.log == [("set_log_base", 0x7F0000001000), ("set_features", ACKED | VHOST_F_LOG_ALL),
                             ring_addr(mem, queues[0], True), ring_addr(mem, queues[1], True)]
    FakeVhost.log = []
    off.set_log(None)
    assert FakeVhost.log == [("set_features", ACKED), ring_addr(mem, queues[0], False),
                             ring_addr(mem, queues[1], False)]


def test_rings_restarted_while_logging_keep_logging(offload):
    """A pause (or the guest's reset of the card) during the migration stops and restarts the rings."""
    off, queues, mem = offload
    FakeVhost.log = []
    off.set_log(0x7F0000002000)                     # before the driver ever started: the base only
    assert FakeVhost.log == [("set_log_base", 0x7F0000002000)]
    FakeVhost.log = []
    off.start(queues, ACKED, 1)
    # LOG_ALL only once the memory table is set: the kernel checks the log covers it (EFAULT before)
    assert FakeVhost.log[:4] == [("set_features", ACKED), FakeVhost.log[1], ("set_log_base", 0x7F0000002000),
                                 ("set_features", ACKED | VHOST_F_LOG_ALL)]
    assert FakeVhost.log[1][0] == "set_mem_table"
    assert ring_addr(mem, queues[0], True) in FakeVhost.log and ring_addr(mem, queues[1], True) in FakeVhost.log
    off.stop()
    off.set_log(None)
    FakeVhost.log = []
    off.start(queues, ACKED, 1)
    assert ("set_features", ACKED) in FakeVhost.log and ring_addr(mem, queues[0], False) in FakeVhost.log
    assert "set_log_base" not in [e[0] for e in FakeVhost.log]


def test_a_vhost_without_log_all_is_one_line(offload, monkeypatch):
    monkeypatch.setattr(FakeVhost, "features", FEATURES & ~VHOST_F_LOG_ALL)
    off = VhostNetOffload([43])
    with pytest.raises(DeviceError) as e:
        off.set_log(0x1000)
    assert "VHOST_F_LOG_ALL" in str(e.value) and "vhost=off" in str(e.value) and "\n" not in str(e.value)
    assert off.log_address is None


# -- a migration with the kernel writing guest RAM ------------------------------------------------
class VhostKernelWrites(VhostDirtyLog):
    """vhost's worker as the tracker sees it: before each of the first `syncs` syncs (while the
    guest runs) it writes `per_sync` pages behind GuestMemory's back (KVM's log cannot see them
    either) and logs them like the kernel. `merge=False` forgets to merge: the control."""

    def __init__(self, source, per_sync: int, syncs: int, merge: bool):
        super().__init__([FakeOffload()], source.memory.ranges)
        self.source, self.per_sync, self.syncs_left, self.merge = source, per_sync, syncs, merge
        self.rng = np.random.default_rng(11)
        self.written: set[int] = set()

    def take_into(self, pending):
        if not self.source.paused and self.syncs_left > 0:
            self.syncs_left -= 1
            pages = self.rng.choice(self.source.memory.size // PAGE, self.per_sync, replace=False)
            for p in pages.tolist():
                self.source.memory.buffer(p * PAGE, 64)[:] = self.rng.bytes(64)
                kernel_log_write(self.buffer.address, p * PAGE, 64)
                self.written.add(p)
        return super().take_into(pending) if self.merge else 0


@pytest.mark.parametrize("merge", [True, False])
def test_pages_vhost_writes_during_the_passes_arrive(merge):
    from test_migrate_precopy import Destination, FakeSource
    a, b = socket.socketpair()
    source = FakeSource(dirty_pages_per_ms=0)           # only the "kernel" writes
    kernel = VhostKernelWrites(source, per_sync=40, syncs=3, merge=merge)
    source.tracker.extra_logs.append(kernel)
    dest = Destination(b)
    dest.start()
    # downtime-limit 0: passes go on until a sync finds nothing, so every kernel write
    # (three syncs' worth) happens after the first pass copied its page
    engine = Precopy(source, Channel(a, io_timeout_s=2.0), {"downtime-limit": 0, "max-bandwidth": 0})
    try:
        engine.run()
    finally:
        a.close()
        dest.join(10)
        source.close()
    assert dest.error is None and dest.go and len(kernel.written) >= 40
    if merge:
        assert dest.ram == source.ram_at_switchover
        assert len(kernel.written) > 100 and engine.stats()["ram"]["dirty-sync-count"] == 3
        assert kernel.pages_logged >= len(kernel.written)
        assert kernel.buffer is None                    # stopped with the tracker
    else:       # the control: the same writes, unmerged, are lost (the test can fail)
        assert dest.ram != source.ram_at_switchover


# -- the migration source wires it ----------------------------------------------------------------
def fake_machine(mem, offloads):
    """What MachineSource reads of a Machine: a board whose devices wrap backends (the PCI
    function's `.device`), some with a kernel data path (`.offload`)."""
    from types import SimpleNamespace
    from kvmpy.machine.runstate import RunState
    devices = [SimpleNamespace(id=f"dev{i}", device=SimpleNamespace(device=SimpleNamespace(offload=o)))
               for i, o in enumerate(offloads)]
    board = SimpleNamespace(devices=devices, vm=FakeVm(mem))
    return SimpleNamespace(board=board, memory=mem, run_state=RunState.RUNNING, status="running",
                           _lock=threading.RLock(),     # the machine's transitions lock (MachineSource attaches under it)
                           add_board_watcher=lambda watcher: None, remove_board_watcher=lambda watcher: None)


def test_the_source_logs_every_vhost_nic():
    from kvmpy.migrate.live import MachineSource
    with GuestMemory(SMALL_HOLE) as mem:
        a, b = FakeOffload(), FakeOffload()
        source = MachineSource(fake_machine(mem, [a, None, b]))
        (vlog,) = source.tracker.extra_logs
        assert isinstance(vlog, VhostDirtyLog) and vlog.offloads == [a, b] and vlog.ranges == list(SMALL_HOLE)
        source.tracker.start()
        assert a.calls == b.calls == [vlog.buffer.address]
        source.tracker.stop()
        assert a.calls[-1] is None and b.calls[-1] is None
        assert MachineSource(fake_machine(mem, [None])).tracker.extra_logs == []


def test_a_kernel_path_that_cannot_log_is_refused_in_one_line():
    from types import SimpleNamespace
    from kvmpy.errors import MigrationError
    from kvmpy.migrate.live import MachineSource
    with GuestMemory.create(2 * MiB) as mem:
        with pytest.raises(MigrationError) as e:
            MachineSource(fake_machine(mem, [SimpleNamespace()]))
        assert "dev0" in str(e.value) and "vhost=off" in str(e.value) and "\n" not in str(e.value)
