"""Block migration without /dev/kvm: the dirty-block map (both virtio-blk data paths mark it,
the take loses no concurrent mark), the DISK section codec and its receiver against corrupt
input (never a write past the image), and the pre-copy engine with `block` against a fake
source whose 'guest' keeps writing its image: the destination's image equals the source's at
switchover, and a refused setup leaves the source running with its image untouched."""
from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.virtio import fastpath
from kvmpy.devices.virtio.blk import T_DISCARD, T_IN, T_OUT, T_WRITE_ZEROES, VirtioBlk
from kvmpy.devices.virtio.blkdirty import BLOCK_SIZE, DirtyBlocks, blocks_of
from kvmpy.devices.virtio.drive import DriveSpec
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.errors import MigrationError
from kvmpy.memslots import GuestMemory
from kvmpy.migrate.block import (BLOCKS, DISK_VERSION, BlockReceiver, DiskBlocks, DiskSetup,
                                 decode_disk, encode_blocks, encode_setup)
from kvmpy.migrate.precopy import ACCEPT, GO, LOADED, REFUSE, Channel, Precopy, receive_memory_and_state
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import DISK_CHUNK_BYTES, DISK_HEADER, DISK_RUN, SectionKind
from support.mock_driver import BumpAllocator, MockPciDriver

from test_migrate_precopy import RAM, FakeSource

IMAGE = 3 * 1024 * 1024 + 5 * 512           # not a whole number of blocks: the last one is partial


# -- the dirty-block map ---------------------------------------------------------------------------
@pytest.mark.parametrize("use_c", [True, False])
@given(marks=st.lists(st.tuples(st.integers(0, IMAGE - 1), st.integers(1, 1 << 20)), max_size=20))
@settings(max_examples=60, deadline=None)
def test_take_returns_exactly_the_marked_blocks_and_clears_them(use_c, marks):
    dirty = DirtyBlocks(IMAGE)
    if not use_c:
        dirty._c_take = None
    expected = np.zeros(blocks_of(IMAGE), dtype=bool)
    for offset, length in marks:
        dirty.mark(offset, length)
        end = min(offset + length, IMAGE + BLOCK_SIZE)
        expected[offset // BLOCK_SIZE:min(-(-end // BLOCK_SIZE), expected.size)] = True
    assert dirty.count() == int(expected.sum())
    assert (dirty.take() == expected).all()
    assert dirty.count() == 0 and not dirty.take().any()


def test_a_concurrent_mark_is_never_lost():
    """A thread sets each block's byte once, without the GIL (ctypes.memset, as the C data path
    marks), while the copier takes: every mark shows up in exactly one take."""
    import ctypes
    assert fastpath.AVAILABLE, "kvmpy.ioctl._kvm lacks the C path: rebuild it"
    dirty = DirtyBlocks(1 << 16 << 16)          # 65536 blocks
    base = ctypes.addressof((ctypes.c_char * dirty.blocks).from_buffer(dirty.map))
    seen = np.zeros(dirty.blocks, dtype=np.int64)
    done = threading.Event()

    def writer():
        for block in range(dirty.blocks):
            ctypes.memset(base + block, 1, 1)
        done.set()

    t = threading.Thread(target=writer)
    t.start()
    takes = 0
    while not done.is_set():
        seen += dirty.take()
        takes += 1
    t.join()
    seen += dirty.take()
    assert takes > 3, "the writer finished before the takes overlapped it"
    assert (seen == 1).all(), f"{int((seen == 0).sum())} marks lost, {int((seen > 1).sum())} seen twice"


HDR, DATA, STATUS = 0x70000, 0x71000, 0x7F000


@pytest.mark.parametrize("datapath", ["c", "python"], indirect=True)
def test_both_data_paths_mark_what_they_write_and_nothing_they_read(tmp_path, datapath):
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 << 20))
    mem = GuestMemory.create(1 << 20)
    blk = VirtioBlk(DriveSpec(str(path)))
    dev = VirtioPciDevice(blk, mem)
    (q,) = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000)).start(1)
    dirty = blk.start_dirty_tracking()

    def request(rtype, sector, data=b"", in_len=0, split_header=False):
        mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector) + data)
        segs = [(HDR, 16 + len(data), False)] if split_header else [(HDR, 16, False)]
        if data and not split_header:
            mem.write(DATA, data)
            segs.append((DATA, len(data), False))
        if in_len:
            segs.append((DATA, in_len, True))
        q.add(segs + [(STATUS, 1, True)])
        dev.handle_notify(0)
        q.used()
        assert mem.read(STATUS, 1)[0] == 0

    try:
        request(T_IN, 0, in_len=8192)                                   # a read marks nothing
        assert dirty.count() == 0
        request(T_OUT, 3 * BLOCK_SIZE // 512, b"x" * 4096)              # the plain path (C when on)
        request(T_OUT, 5 * BLOCK_SIZE // 512 - 1, b"y" * 1024, split_header=True)   # Python always
        request(T_WRITE_ZEROES, 0, struct.pack("<QII", 10 * BLOCK_SIZE // 512, 8, 0))
        request(T_DISCARD, 0, struct.pack("<QII", 12 * BLOCK_SIZE // 512, BLOCK_SIZE // 512 + 1, 0))
        if datapath == "c":
            assert blk._cblk.completed >= 2        # the read and the plain write went through C
        assert np.flatnonzero(dirty.take()).tolist() == [3, 4, 5, 10, 12, 13]
        blk.stop_dirty_tracking()
        request(T_OUT, 0, b"z" * 512)
        assert dirty.count() == 0 and blk.dirty_blocks is None
    finally:
        blk.close()
        mem.close()


# -- the section codec -----------------------------------------------------------------------------
def test_setup_and_blocks_round_trip():
    assert decode_disk(encode_setup([(0, BLOCK_SIZE, IMAGE), (3, 4096, 512)])) == \
        DiskSetup(((0, BLOCK_SIZE, IMAGE), (3, 4096, 512)))
    runs = [(0, 1024, False), (4096, 8192, True), (1 << 40, 512, False)]
    data = b"a" * 1024 + b"b" * 512
    section = decode_disk(encode_blocks(7, runs) + data)
    assert isinstance(section, DiskBlocks) and section.drive == 7 and list(section.runs) == runs
    assert bytes(section.data) == data


@pytest.mark.parametrize("payload, message", [
    (b"\x01\x01", "DISK section of 2 bytes"),
    (DISK_HEADER.pack(2, BLOCKS, 0, 1), "version 2"),
    (DISK_HEADER.pack(DISK_VERSION, 9, 0, 1), "type 9"),
    (DISK_HEADER.pack(DISK_VERSION, BLOCKS, 0, 0), "0 runs"),
    (DISK_HEADER.pack(DISK_VERSION, BLOCKS, 0, 2) + DISK_RUN.pack(0, 512, 0), "2 runs"),
    (encode_blocks(0, [(100, 512, True)]), "offset 100"),
    (encode_blocks(0, [(0, 0, True)]), "length 0"),
    (encode_blocks(0, [(0, 512, False)]) + b"x" * 511, "512 bytes of data but 511"),
    (encode_blocks(0, [(0, DISK_CHUNK_BYTES, True), (0, 512, True)]), "covering"),
    (DISK_HEADER.pack(DISK_VERSION, BLOCKS, 0, 1) + DISK_RUN.pack(0, 512, 6), "flags 0x6"),
    (encode_setup([(0, 1000, 512)]), "block size 1000"),
    (encode_setup([(1, 4096, 512), (1, 4096, 512)]), "twice"),
])
def test_malformed_sections_are_one_error(payload, message):
    with pytest.raises(MigrationError, match=message):
        decode_disk(payload)


class FileDisk:
    """A drive over a file, for either side."""

    def __init__(self, path, index=0, readonly=False, size=IMAGE, data=None, sparse=False):
        path.write_bytes(b"" if sparse else data if data is not None else os.urandom(size))
        os.truncate(path, size)
        self.path, self.index, self.readonly = str(path), index, readonly
        self.fd = os.open(path, os.O_RDWR)
        self.image_bytes = size
        self.dirty: DirtyBlocks | None = None
        self.claims = 0

    # source
    def start_dirty_tracking(self):
        self.dirty = DirtyBlocks(self.image_bytes)
        return self.dirty

    def stop_dirty_tracking(self):
        self.dirty = None

    def guest_write(self, offset, data):
        os.pwrite(self.fd, data, offset)
        if (dirty := self.dirty) is not None:       # after the write, as VirtioBlk does
            dirty.mark(offset, len(data))

    # destination
    def claim(self):
        self.claims += 1

    def digest(self):
        return hashlib.sha256(os.pread(self.fd, self.image_bytes + 1, 0)).hexdigest()

    def close(self):
        os.close(self.fd)


def receiver(disks, answers):
    return BlockReceiver(disks, lambda word, text: answers.append((word, text)), ACCEPT, REFUSE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.integers(0, 300))
def test_a_corrupt_blocks_section_never_writes_past_the_image(tmp_path, flips, cut):
    size = 8 * 512
    disk = FileDisk(tmp_path / "dest.img", size=size, data=bytes(size))
    try:
        answers: list = []
        r = receiver([disk], answers)
        r.handle(encode_setup([(0, BLOCK_SIZE, size)]))
        good = bytearray(encode_blocks(0, [(size - 1024, 512, False), (0, 512, True), (2048, 1024, False)])
                         + b"\xaa" * 1536)
        for at, xor in flips:
            if at < len(good):
                good[at] ^= xor
        try:
            r.handle(bytes(good[:len(good) - cut % 40]))
        except MigrationError:
            pass
        assert os.fstat(disk.fd).st_size == size, "a corrupt section grew the image"
    finally:
        disk.close()


def test_the_receiver_refuses_what_does_not_fit(tmp_path):
    ro = FileDisk(tmp_path / "ro.img", index=1, readonly=True, size=4096)
    rw = FileDisk(tmp_path / "rw.img", index=0, size=8192)
    try:
        cases = [([(2, BLOCK_SIZE, 4096)], "drive 2, which this machine does not have"),
                 ([(1, BLOCK_SIZE, 4096)], "read-only here"),
                 ([(0, BLOCK_SIZE, 4096)], "8192 bytes here, the source's 4096")]
        for drives, message in cases:
            answers: list = []
            with pytest.raises(MigrationError, match=message):
                receiver([ro, rw], answers).handle(encode_setup(drives))
            assert answers[0][0] == REFUSE and message in answers[0][1]
        answers = []
        r = receiver([ro, rw], answers)
        with pytest.raises(MigrationError, match="before the DISK SETUP"):
            r.handle(encode_blocks(0, [(0, 512, True)]))
        r.handle(encode_setup([(0, BLOCK_SIZE, 8192)]))
        assert answers == [(ACCEPT, "")] and rw.claims == 1
        with pytest.raises(MigrationError, match="drive 1, which the SETUP did not name"):
            r.handle(encode_blocks(1, [(0, 512, True)]))
        before = rw.digest()
        with pytest.raises(MigrationError, match="beyond drive 0's 8192 bytes"):
            r.handle(encode_blocks(0, [(0, 512, False), (8192, 512, True)]) + b"q" * 512)
        assert rw.digest() == before, "a refused section wrote its first run"
        with pytest.raises(MigrationError, match="second DISK SETUP"):
            r.handle(encode_setup([(0, BLOCK_SIZE, 8192)]))
    finally:
        ro.close()
        rw.close()


# -- the engine with `block` -------------------------------------------------------------------------
class BlockSource(FakeSource):
    """FakeSource whose guest also keeps writing its disks (a hot set and random blocks)."""

    def __init__(self, disks, rate=4):
        self.disks = disks
        self.disk_digests: list[str] = []
        self.tracked_writes = 0             # guest disk writes while block migration tracked them
        super().__init__(rate)

    def _guest(self) -> None:
        rng = np.random.default_rng()
        disk_stop = threading.Event()

        def disk_guest():
            n = 0
            writable = self.block_disks()
            while not disk_stop.is_set():
                disk = writable[n % len(writable)]
                offset = int(rng.integers(disk.image_bytes // 512)) * 512 if n % 2 else (n % 8) * BLOCK_SIZE
                length = min(int(rng.integers(1, 64)) * 512, disk.image_bytes - offset)
                disk.guest_write(offset, bytes(length) if n % 5 == 0 else rng.bytes(length))
                self.tracked_writes += disk.dirty is not None
                n += 1
                time.sleep(0.0005)
        t = threading.Thread(target=disk_guest, daemon=True)
        t.start()
        try:
            super()._guest()
        finally:
            disk_stop.set()
            t.join()

    def pause(self) -> None:
        super().pause()
        self.disk_digests = [d.digest() for d in self.disks]

    def block_disks(self):
        return [d for d in self.disks if not d.readonly]


def migrate_block(tmp_path, dest_sizes=None, rate=4):
    # drive 1 starts as one hole (SEEK_DATA: sent as a ZERO run without reading), drive 2 is read-only
    src_disks = [FileDisk(tmp_path / "src0.img", 0), FileDisk(tmp_path / "src1.img", 1, size=1 << 20, sparse=True),
                 FileDisk(tmp_path / "src2.img", 2, readonly=True, size=4096)]
    sizes = dest_sizes or [IMAGE, 1 << 20, 4096]
    dest_disks = [FileDisk(tmp_path / f"dst{i}.img", i, readonly=i == 2, size=s) for i, s in enumerate(sizes)]
    a, b = socket.socketpair()
    source = BlockSource(src_disks, rate)
    result: dict = {}

    def destination():
        f = b.makefile("rb")
        reader = StreamReader(f)
        assert reader.next_section().kind is SectionKind.CONFIG
        b.sendall(ACCEPT + b"\n")
        blocks = BlockReceiver(dest_disks, lambda w, t: b.sendall(w + (b" " + t.encode() if t else b"") + b"\n"),
                               ACCEPT, REFUSE)
        memory = GuestMemory.create(RAM)
        try:
            receive_memory_and_state(reader, [(0, memory.buffer(0, RAM))], blocks.handle)
            blocks.finish()
            result["digests"] = [d.digest() for d in dest_disks]
            b.sendall(LOADED + b"\n")
            result["go"] = f.readline(64) == GO + b"\n"
        except Exception as e:
            result["error"] = e
        finally:
            memory.close()
            b.close()

    t = threading.Thread(target=destination, daemon=True)
    t.start()
    engine = Precopy(source, Channel(a, io_timeout_s=5.0), {"downtime-limit": 300, "max-bandwidth": 16 << 20},
                     reply_timeout_s=10.0, capabilities={"block": True})
    error = None
    try:
        engine.run()
    except MigrationError as e:
        error = e
    finally:
        a.close()
    t.join(20)
    return source, src_disks, dest_disks, engine, error, result


def test_the_destination_images_equal_the_sources_at_switchover(tmp_path):
    source, src, dst, engine, error, result = migrate_block(tmp_path)
    try:
        assert error is None and "error" not in result and result["go"]
        assert result["digests"][:2] == source.disk_digests[:2], "a disk differs after block migration"
        assert result["digests"][2] != source.disk_digests[2], "the read-only drive was copied"
        assert all(d.dirty is None for d in src), "dirty tracking left on"
        assert source.tracked_writes > 20, "the guest did not write its disks during the migration"
        stats = engine.stats()
        assert stats["disk"]["total"] == IMAGE + (1 << 20) and stats["disk"]["remaining"] == 0
        assert IMAGE < stats["disk"]["transferred"] < 4 * IMAGE
        assert source.completed_ and source.resumes == 0
    finally:
        source.close()
        for d in src + dst:
            d.close()


def test_a_size_mismatch_is_refused_and_the_source_runs_on(tmp_path):
    source, src, dst, engine, error, result = migrate_block(tmp_path, dest_sizes=[IMAGE, 1 << 21, 4096])
    try:
        assert isinstance(error, MigrationError) and "refused the block migration" in str(error)
        assert "drive 1" in str(error) and "2097152 bytes here" in str(error)
        assert source.running and not source.completed_ and engine.stats()["status"] == "failed"
        assert all(d.dirty is None for d in src)
    finally:
        source.close()
        for d in src + dst:
            d.close()
