"""Dirty tracking for live migration without /dev/kvm: GuestMemory's userspace dirty map (what
kvmpy writes itself, on both virtio data paths) and DirtyTracker merging it with a fake KVM log
(manual protect and the clear-on-read fallback)."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.devices.virtio.blk import T_IN, DriveSpec, VirtioBlk
from support.mock_driver import BumpAllocator, MockPciDriver
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.errors import IoctlError
from kvmpy.memslots import GuestMemory, bitmap_to_pages, pages_to_bitmap
from kvmpy.memslots.dirty import DirtyTracker

PAGE = 4096


class FakeVm:
    """KVM's dirty log as a model: a guest write logs its page while the slot logs; with manual
    protect GET only reads and CLEAR re-protects, without it GET clears as it reads."""

    def __init__(self, memory: GuestMemory, manual: bool = True):
        self.memory, self.manual_supported, self.manual = memory, manual, False
        self.logging: dict[int, bool] = {}
        self.log = {r.slot: np.zeros(r.size // PAGE, dtype=bool) for r in memory.ranges}
        self.regions: list[tuple] = []

    def enable_manual_dirty_log_protect(self) -> None:
        if not self.manual_supported:
            raise IoctlError("enabling manual dirty-log protect", detail="not supported")
        self.manual = True

    def set_user_memory_region(self, slot, gpa, size, addr, flags=0) -> None:
        from kvmpy.ioctl import lib
        self.regions.append((slot, gpa, size, addr, flags))
        self.logging[slot] = bool(flags & lib.KVM_MEM_LOG_DIRTY_PAGES)

    def guest_write(self, gpa: int, data: bytes) -> None:
        """A vCPU's store: invisible to GuestMemory, seen by KVM's log."""
        self.memory.buffer(gpa, len(data))[:] = data
        for r in self.memory.ranges:
            if r.gpa <= gpa < r.end and self.logging.get(r.slot):
                first, last = (gpa - r.gpa) // PAGE, (gpa - r.gpa + len(data) - 1) // PAGE
                self.log[r.slot][first:last + 1] = True

    def get_dirty_log(self, slot, npages):
        bits = self.log[slot].copy()
        if not self.manual:
            self.log[slot][:] = False
        return pages_to_bitmap(np.flatnonzero(bits), npages)

    def clear_dirty_log(self, slot, first, num, words):
        assert self.manual and first % 64 == 0
        assert num % 64 == 0 or first + num == self.log[slot].size
        pages = bitmap_to_pages(words, num) + first
        self.log[slot][pages] = False


@pytest.fixture
def mem():
    m = GuestMemory.create(2 << 20)
    yield m
    m.close()


def dirty_pages(mem: GuestMemory, index: int = 0) -> list[int]:
    return np.flatnonzero(np.frombuffer(mem.dirty_maps[index], dtype=np.uint8)).tolist()


def test_own_writes_are_marked_only_while_tracking(mem):
    mem.write(0x5000, b"x")
    assert dirty_pages(mem) == []                       # not migrating: nothing recorded
    mem.start_tracking()
    mem.write(0x1FFF, b"ab")                            # straddles pages 1 and 2
    mem.fill(0x8000, 3 * PAGE + 1, 7)                   # pages 8..11
    mem.write_u16(0x20000, 1)
    mem.write_u32(0x21000, 1)
    mem.write_u64(0x22FFC, 1)                           # pages 0x22 and 0x23
    assert dirty_pages(mem) == [1, 2, 8, 9, 10, 11, 0x20, 0x21, 0x22, 0x23]
    mem.stop_tracking()
    mem.write(0x30000, b"y")
    assert 0x30 not in dirty_pages(mem)
    mem.start_tracking()                                # a new migration starts from a clean map
    assert dirty_pages(mem) == []


@given(st.lists(st.tuples(st.integers(0, (2 << 20) - 1), st.integers(1, 3 * PAGE)), max_size=20))
@settings(max_examples=60, deadline=None)
def test_mark_dirty_covers_exactly_the_touched_pages(writes):
    with GuestMemory.create(2 << 20) as m:
        m.start_tracking()
        expected = set()
        for gpa, length in writes:
            length = min(length, m.size - gpa)
            m.mark_dirty(gpa, length)
            expected |= set(range(gpa // PAGE, (gpa + length - 1) // PAGE + 1))
        assert dirty_pages(m) == sorted(expected)


def test_virtio_blk_reads_mark_the_guest_buffers_and_used_ring(mem, tmp_path, datapath):
    """Both data paths (conftest's datapath): Python through Virtqueue.push, C in vqfast.c."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 256)
    blk = VirtioBlk(DriveSpec(str(image)))
    dev = VirtioPciDevice(blk, mem)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000))
    (q,) = drv.start(1)
    hdr, data, status = 0x70000, 0x71000, 0x7F000
    mem.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
    q.add([(hdr, 16, False), (data, 2 * PAGE, True), (status, 1, True)])
    mem.start_tracking()                                 # only what the device writes from here
    dev.handle_notify(0)
    (used,) = q.used()
    assert used[1] == 2 * PAGE + 1
    queue = dev.queues[0]
    used_pages = set(range(queue.used_addr // PAGE, (queue.used_addr + 6 + 8 * queue.size - 1) // PAGE + 1))
    marked = set(dirty_pages(mem))
    assert {0x71, 0x72, 0x7F} <= marked and used_pages <= marked
    assert 0x70 not in marked                            # the header is only read
    blk.close()


@pytest.mark.parametrize("manual", [True, False])
def test_tracker_merges_kvm_log_and_own_writes(mem, manual):
    vm = FakeVm(mem, manual)
    tracker = DirtyTracker(mem, vm)
    vm.guest_write(0x3000, b"before")                    # not logging yet
    mem.write(0x4000, b"before")
    tracker.start()
    assert tracker.manual_protect is manual
    assert all(flags for *_, flags in vm.regions)        # slots re-registered with LOG_DIRTY_PAGES
    vm.guest_write(0x5000, b"guest")
    mem.write(0x1F0000, b"kvmpy")
    assert tracker.sync() == 2
    assert tracker.sync() == 2                           # counting twice loses nothing
    taken = tracker.take(0, 0, 256)
    assert np.flatnonzero(taken).tolist() == [5]
    vm.guest_write(0x5000, b"again")                     # after the take: dirty again
    assert tracker.sync() == 2
    assert np.flatnonzero(tracker.take(0, 0, 256)).tolist() == [5]
    assert np.flatnonzero(tracker.take(0, 256, 256)).tolist() == [0x1F0 - 256]
    assert tracker.sync() == 0
    tracker.stop()
    assert not vm.regions[-1][-1] and not mem.tracking


def test_a_last_take_reports_the_same_pages_without_write_protecting_them(mem):
    """take(protect=False), the switchover's: the same pages, pending and the userspace map
    cleared, and no KVM_CLEAR_DIRTY_LOG (KVM's copy of the bits stays: the log is off next)."""
    vm = FakeVm(mem, manual=True)
    tracker = DirtyTracker(mem, vm)
    tracker.start()
    vm.guest_write(0x5000, b"guest")
    mem.write(0x9000, b"kvmpy")
    assert tracker.sync() == 2
    cleared = []
    vm.clear_dirty_log = lambda *args: cleared.append(args)
    assert np.flatnonzero(tracker.take(0, 0, 256, protect=False)).tolist() == [5, 9]
    assert cleared == [] and vm.log[mem.ranges[0].slot][5]
    assert not mem.dirty_maps[0][9]
    tracker.stop()


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 511)), max_size=60), st.booleans())
@settings(max_examples=50, deadline=None)
def test_tracker_never_loses_a_write(ops, manual):
    """Model check: interleave guest and kvmpy writes with sync/take in random order; every page
    written after its last take is reported by the next sync + take."""
    with GuestMemory.create(2 << 20) as m:
        vm = FakeVm(m, manual)
        tracker = DirtyTracker(m, vm)
        tracker.start()
        owed: set[int] = set()
        for i, (by_guest, page) in enumerate(ops):
            if by_guest:
                vm.guest_write(page * PAGE, b"g")
            else:
                m.write(page * PAGE, b"k")
            owed.add(page)
            if i % 7 == 3:
                tracker.sync()
                got = set(np.flatnonzero(tracker.take(0, 0, 512)).tolist())
                assert owed <= got
                owed.clear()
        tracker.sync()
        got = set()
        for first in range(0, 512, 64):
            got |= {first + p for p in np.flatnonzero(tracker.take(0, first, 64)).tolist()}
        assert owed <= got


def test_blk_lock_handover(tmp_path):
    """A second VirtioBlk on a locked image: refused, except inside lock_handover(), where it waits
    with its requests in the ring until the first one unlocks."""
    from kvmpy.devices.virtio.imagelock import lock_handover
    from kvmpy.errors import DeviceError
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 16))
    source = VirtioBlk(DriveSpec(str(image)))
    with pytest.raises(DeviceError, match="in use by another VM"):
        VirtioBlk(DriveSpec(str(image)))
    with lock_handover():
        dest = VirtioBlk(DriveSpec(str(image)))
    assert dest.lock_pending and not source.lock_pending
    with pytest.raises(DeviceError, match="still in use"):
        dest.take_lock(0.05)
    source.unlock()
    dest.take_lock(1.0)
    assert not dest.lock_pending and source.lock_pending
    with pytest.raises(DeviceError, match="still in use"):
        source.take_lock()                  # the source may not write any more
    dest.close()
    source.take_lock()
    source.close()


def test_dirty_chunks_name_exactly_the_chunks_with_something_to_send():
    """A pass walks only these (an idle guest's pass must not cost a walk of all RAM)."""
    m = GuestMemory.create(2 << 20 | 12 * PAGE)          # 524 pages: the last chunk is partial
    try:
        vm = FakeVm(m)
        tracker = DirtyTracker(m, vm)
        tracker.start()
        assert tracker.sync() == 0 and tracker.dirty_chunks(0, 64) == []
        vm.guest_write(5 * PAGE, b"g")                    # chunk 0, via KVM's log
        m.write(200 * PAGE, b"u")                         # chunk 192, via the userspace map
        vm.guest_write(523 * PAGE, b"g")                  # the partial last chunk
        tracker.sync()
        assert tracker.dirty_chunks(0, 64) == [0, 192, 512]
        for first in tracker.dirty_chunks(0, 64):
            tracker.take(0, first, 64)
        assert tracker.dirty_chunks(0, 64) == []
        m.write(300 * PAGE, b"u")                         # userspace marks count without a sync
        assert tracker.dirty_chunks(0, 64) == [256]
    finally:
        m.close()
