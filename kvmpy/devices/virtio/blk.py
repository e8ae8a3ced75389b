"""virtio-blk (device type 2) over a raw image file.

Data moves with os.preadv/os.pwritev straight between the file and memoryviews of guest RAM.
With cache=none (as QEMU's) aligned requests use a second, O_DIRECT descriptor, so the host page
cache is bypassed and the host's disk DMAs into guest RAM; unaligned ones use the buffered fd.
Every request is checked (header size, sector range, 512-byte multiples, segment lists) and a
bad one is answered IOERR/UNSUPP; only a broken ring resets the device. The image is locked with
flock (exclusive, or shared when read-only) so two VMs cannot write one disk; live migration
hands it over (imagelock.py), and a device without it leaves requests in the ring.
With the C data path (fastpath.py) plain reads and writes run in C, GIL released; it hands every
other request (flush, get-id, discard, odd layouts, refusals this code logs) back to `_handle`.
Block migration (kvmpy.migrate.block) tracks the blocks written through both paths in one
DirtyBlocks map (blkdirty.py): `start_dirty_tracking()` / `stop_dirty_tracking()`.
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from kvmpy.devices.virtio import fastpath
from kvmpy.devices.virtio.blkdirty import DirtyBlocks
from kvmpy.devices.virtio.device import VIRTIO_ID_BLOCK, VirtioDevice
from kvmpy.devices.virtio.imagelock import ImageLock
from kvmpy.devices.virtio.drive import CACHE_MODES, ID_BYTES, DriveSpec, parse_drive_spec  # noqa: F401
from kvmpy.devices.virtio.queue import DescChain, Virtqueue, slice_segments
from kvmpy.memslots import GuestMemory
from kvmpy.errors import ConfigError, DeviceError, StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import check_int, expect_state, versioned

log = logging.getLogger(__name__)

SECTOR = 512
VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_RO = 1 << 1, 1 << 2, 1 << 5
VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH = 1 << 6, 1 << 9
VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES = 1 << 13, 1 << 14
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
SIZE_MAX = 1 << 20          # per-segment bound advertised to the driver
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 32
WRITE_ZEROES_UNMAP = 1
_HDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10
DIRECT_ALIGN = 4096         # O_DIRECT buffer/offset/length alignment that every host device accepts
IOV_MAX = 1024

_libc = ctypes.CDLL(None, use_errno=True)  # libc is loaded already; find_library would run ldconfig
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _image_bytes(fd: int, path: str) -> int:
    """Size of a regular image file or a block device (whose st_size is 0)."""
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            return st.st_size
        if stat.S_ISBLK(st.st_mode):
            return os.lseek(fd, 0, os.SEEK_END)
    except OSError as e:
        os.close(fd)
        raise ConfigError(f"sizing disk image {path!r}", errno=e.errno) from None
    os.close(fd)
    raise ConfigError(f"opening disk image {path!r}", detail="not a regular file or block device")


@versioned("virtio-blk", 1)
@dataclass
class BlkState:
    """What the guest's driver has read from this disk and relies on: its size, whether it is
    read-only, its serial (GET_ID). Restore refuses a disk that differs, rather than let the
    guest write past the end of a smaller image.

    Nothing about open files (path, descriptors, O_DIRECT, locks: configuration, reopened by
    the destination) and no request: requests are synchronous, each popped chain is answered
    (data moved, status written, chain pushed) before `process_queue` returns, under the
    transport's lock, and a paused machine has processed every queue (the pause quiesces the
    I/O loop). So no request is half done when the state is taken; the queue state (avail and
    used positions, in the transport's state) says everything about requests."""
    capacity: int
    readonly: bool
    serial: str


class VirtioBlk(VirtioDevice):
    """A raw image as a virtio disk (QEMU's virtio-blk)."""

    DEVICE_KIND: ClassVar[str] = "virtio-blk"
    device_type = VIRTIO_ID_BLOCK
    num_queues = 1
    name = "blk"
    pci_class = 0x018000

    def __init__(self, spec: DriveSpec, fast: bool | None = None):
        super().__init__()
        self.spec = spec
        self.readonly = spec.readonly
        self.serial = spec.serial.encode()[:ID_BYTES]
        self.seg_max = self.queue_max_size - 2
        self._ram0: tuple[int, int, memoryview] = (0, 0, memoryview(b""))
        self._direct_requests = 0
        self._ratelog = RateLimitedLog(log)
        try:
            self.fd = os.open(spec.file, (os.O_RDONLY if spec.readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"opening disk image {spec.file!r}", errno=e.errno) from None
        try:
            self._lock = ImageLock(self.fd, spec.readonly, spec.file)
        except DeviceError:
            os.close(self.fd)
            self.fd = -1
            raise
        self.capacity = _image_bytes(self.fd, spec.file) // SECTOR
        self.direct_fd = -1
        if spec.cache == "none":
            try:
                self.direct_fd = os.open(spec.file, (os.O_RDONLY if spec.readonly else os.O_RDWR)
                                         | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as e:
                self.close()
                raise ConfigError(f"opening disk image {spec.file!r} with O_DIRECT (cache=none)",
                                  errno=e.errno, detail="the filesystem may not support O_DIRECT") from None
        self._cblk = fastpath.new_blk(self.capacity, self.readonly) if fastpath.wanted(fast) else None
        self.dirty_blocks: DirtyBlocks | None = None       # block migration's map, while it copies

    # -- block migration -----------------------------------------------------------------------
    def start_dirty_tracking(self) -> DirtyBlocks:
        """From now on mark every block either data path writes (a fresh, clean map). Under the
        transport's lock, which every request runs under: C never sees a half-set pointer."""
        with self.lock:
            dirty = DirtyBlocks(self.capacity * SECTOR)
            self.dirty_blocks = dirty
            if self._cblk is not None and dirty.c_pointer is not None:
                self._cblk.dirty_blocks, self._cblk.block_shift = dirty.blocks, dirty.shift
                self._cblk.dirty = dirty.c_pointer
            return dirty

    def stop_dirty_tracking(self) -> None:
        with self.lock:
            self.dirty_blocks = None
            if self._cblk is not None:
                self._cblk.dirty = fastpath.ffi.NULL

    @property
    def lock_pending(self) -> bool:
        """The image's lock is elsewhere (migration handover): no request is served."""
        return self._lock.pending

    def unlock(self) -> None:
        self._lock.unlock()

    def take_lock(self, timeout_s: float = 0.0) -> None:
        self._lock.take(timeout_s)

    def close(self) -> None:
        if self.direct_fd >= 0:
            os.close(self.direct_fd)
            self.direct_fd = -1
        if self.fd >= 0:
            os.close(self.fd)  # closing drops the flock
            self.fd = -1

    def device_features(self) -> int:
        f = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE | VIRTIO_BLK_F_FLUSH
        if self.readonly:
            return f | VIRTIO_BLK_F_RO
        return f | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES

    def config_bytes(self) -> bytes:
        return struct.pack("<QII HBB I BBHI BBH IIIII B3x", self.capacity, SIZE_MAX, self.seg_max, 0, 0, 0, SECTOR,
                           0, 0, 1, 0, 0, 0, 1, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
                           MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)

    def activate(self, mem: GuestMemory, queues: list[Virtqueue], interrupt: Callable[[Virtqueue], None],
                 driver_features: int) -> None:
        super().activate(mem, queues, interrupt, driver_features)
        first = mem.ranges[0]  # one view of the first RAM range: segment views are plain slices
        self._ram0 = (first.gpa, first.gpa + first.size, mem.buffer(first.gpa, first.size))

    def reset(self) -> None:
        super().reset()
        self._ram0 = (0, 0, memoryview(b""))

    def process_queue(self, index: int) -> None:
        q = self.queues[index]
        if self.lock_pending:
            try:
                self.take_lock()
            except DeviceError as e:    # never write a disk another VM may be writing
                self._ratelog.warning("lock", "virtio-blk: requests wait: %s", e)
                return
        pushed = False
        if self._cblk is not None and q.cring is not None:
            self._cblk.fd, self._cblk.direct_fd = self.fd, self.direct_fd
            pushed = fastpath.blk_process(q, q.cring, self._cblk, self._handle_c, self._log_c_note)
        else:
            while (chain := q.pop()) is not None:
                q.push(chain, self._handle(chain))
                pushed = True
        if pushed:
            self.signal_used(q)

    def _handle_c(self, chain: DescChain) -> int:
        """A chain the C loop handed back; `_rw` may give up O_DIRECT, which C must then see."""
        written = self._handle(chain)
        self._cblk.direct_fd = self.direct_fd
        return written

    def _log_c_note(self, b: Any) -> None:
        """What `_rw` logs (and does about a refused O_DIRECT fd) for a request C finished."""
        if b.direct_errno:
            self._ratelog.warning("direct", "%s: O_DIRECT refused (%s); using the page cache",
                                  self.spec.file, OSError(b.direct_errno, os.strerror(b.direct_errno)))
            if self.direct_fd >= 0:
                os.close(self.direct_fd)
                self.direct_fd = b.direct_fd = -1
        if b.io_errno:
            e = OSError(errno.EIO, "short transfer") if b.io_short else OSError(b.io_errno, os.strerror(b.io_errno))
            self._ratelog.warning("io", "%s: %s failed: %s", self.spec.file, "write" if b.io_write else "read", e)

    # -- one request ---------------------------------------------------------------------------
    def _handle(self, chain: DescChain) -> int:
        """Run one request; returns bytes written into the chain (data + status byte)."""
        mem = self.mem
        assert mem is not None
        if chain.readable_len < _HDR.size or chain.writable_len < 1:
            self._ratelog.warning("malformed", "%s: request without header or status byte", self.spec.file)
            if chain.writable_len >= 1:
                self._put_status(chain, S_IOERR)
                return 1
            return 0
        readable, writable = chain.readable, chain.writable
        first_addr, first_len = readable[0]
        if first_len == _HDR.size:  # the usual layout: header and status byte on their own
            rtype, _, sector = _HDR.unpack_from(mem.buffer(first_addr, _HDR.size))
            out_data = readable[1:]
        else:
            hdr = b"".join(mem.read(a, n) for a, n in slice_segments(readable, 0, _HDR.size))
            rtype, _, sector = _HDR.unpack(hdr)
            out_data = slice_segments(readable, _HDR.size, chain.readable_len - _HDR.size)
        in_len = chain.writable_len - 1
        in_data = writable[:-1] if writable[-1][1] == 1 else slice_segments(writable, 0, in_len)
        written = 0
        if rtype == T_IN:
            status = self._rw(sector, in_data, in_len, write=False)
            written = in_len if status == S_OK else 0
        elif rtype == T_OUT:
            status = S_IOERR if self.readonly else self._rw(sector, out_data, chain.readable_len - _HDR.size, True)
        elif rtype == T_FLUSH:
            status = self._flush()
        elif rtype == T_GET_ID:
            ident = self.serial.ljust(ID_BYTES, b"\x00")[:min(ID_BYTES, in_len)]
            self._scatter(in_data, ident)
            status, written = S_OK, len(ident)
        elif rtype in (T_DISCARD, T_WRITE_ZEROES):
            status = S_UNSUPP if self.readonly else self._discard(out_data, chain.readable_len - _HDR.size,
                                                                 rtype == T_WRITE_ZEROES)
        else:
            status = S_UNSUPP
        self._put_status(chain, status)
        return written + 1

    @property
    def direct_requests(self) -> int:
        """Requests that started on the O_DIRECT fd (either path): shows cache=none at work."""
        return self._direct_requests + (self._cblk.direct_reqs if self._cblk is not None else 0)

    def _put_status(self, chain: DescChain, status: int) -> None:
        addr, n = chain.writable[-1]
        if n == 0:
            addr, _ = slice_segments(chain.writable, chain.writable_len - 1, 1)[0]
        else:
            addr += n - 1
        self.mem.buffer(addr, 1)[0] = status  # type: ignore[union-attr]

    def _scatter(self, segs: list[tuple[int, int]], data: bytes) -> None:
        pos = 0
        for addr, n in segs:
            if pos >= len(data):
                break
            piece = data[pos:pos + n]
            self.mem.write(addr, piece)  # type: ignore[union-attr]
            pos += len(piece)

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return nbytes % SECTOR == 0 and sector <= self.capacity and nbytes // SECTOR <= self.capacity - sector

    def _rw(self, sector: int, segs: list[tuple[int, int]], nbytes: int, write: bool) -> int:
        if not self._in_range(sector, nbytes):
            self._ratelog.warning("range", "%s: request sector=%d bytes=%d beyond capacity %d",
                                  self.spec.file, sector, nbytes, self.capacity)
            return S_IOERR
        if nbytes == 0:
            return S_OK
        mem = self.mem
        assert mem is not None
        lo, hi, ram = self._ram0
        views = [ram[a - lo:a - lo + n] if lo <= a and a + n <= hi else mem.buffer(a, n) for a, n in segs]
        offset = sector * SECTOR
        fd = self.fd
        if self.direct_fd >= 0 and not offset % DIRECT_ALIGN \
                and not any((a | n) % DIRECT_ALIGN for a, n in segs):
            fd = self.direct_fd  # guest RAM is page-aligned host memory: GPA alignment carries over
            self._direct_requests += 1
        start = offset
        try:
            while views:  # short reads/writes: continue where the syscall stopped
                batch = views[:IOV_MAX]
                try:
                    done = os.pwritev(fd, batch, offset) if write else os.preadv(fd, batch, offset)
                except OSError as e:
                    if fd == self.fd or e.errno != errno.EINVAL:
                        raise
                    self._ratelog.warning("direct", "%s: O_DIRECT refused (%s); using the page cache",
                                          self.spec.file, e)
                    os.close(self.direct_fd)
                    self.direct_fd = -1
                    fd = self.fd
                    continue
                if done <= 0:
                    raise OSError(errno.EIO, "short transfer")
                offset += done
                if done % DIRECT_ALIGN:
                    fd = self.fd  # a short O_DIRECT transfer leaves an unaligned rest
                while views and done >= len(views[0]):
                    done -= len(views.pop(0))
                if done:
                    views[0] = views[0][done:]
        except OSError as e:
            self._ratelog.warning("io", "%s: %s failed: %s", self.spec.file, "write" if write else "read", e)
            return S_IOERR
        finally:
            if write and (dirty := self.dirty_blocks) is not None:     # after the write, even a failed one
                dirty.mark(start, nbytes)
        return S_OK

    def _flush(self) -> int:
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            self._ratelog.warning("flush", "%s: fdatasync failed: %s", self.spec.file, e)
            return S_IOERR
        return S_OK

    def _discard(self, segs: list[tuple[int, int]], nbytes: int, zeroes: bool) -> int:
        if nbytes == 0 or nbytes % _SEG.size or nbytes // _SEG.size > MAX_DISCARD_SEG:
            return S_IOERR
        raw = b"".join(self.mem.read(a, n) for a, n in segs)  # type: ignore[union-attr]
        ranges = []
        for off in range(0, nbytes, _SEG.size):
            sector, count, flags = _SEG.unpack_from(raw, off)
            if flags & ~WRITE_ZEROES_UNMAP or (flags and not zeroes) or count > MAX_DISCARD_SECTORS \
                    or not self._in_range(sector, count * SECTOR):
                return S_IOERR
            ranges.append((sector * SECTOR, count * SECTOR))
        for offset, length in ranges:
            if length == 0:
                continue
            try:
                if zeroes:
                    self._zero_range(offset, length)
                else:
                    fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            except OSError as e:
                if zeroes or e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                    self._ratelog.warning("discard", "%s: discard/zero failed: %s", self.spec.file, e)
                    return S_IOERR
                # discard is only a hint: a filesystem without hole punching simply ignores it
            finally:
                if (dirty := self.dirty_blocks) is not None:   # the blocks changed (or may have)
                    dirty.mark(offset, length)
        return S_OK

    def _zero_range(self, offset: int, length: int) -> None:
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            chunk = bytes(min(length, 1 << 20))
            while length:
                n = os.pwrite(self.fd, chunk[:min(length, len(chunk))], offset)
                offset, length = offset + n, length - n

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> BlkState:
        return BlkState(self.capacity, self.readonly, self.serial.decode(errors="replace"))

    def check_state(self, state: object) -> BlkState:
        what = f"virtio-blk {self.spec.file}"
        s = expect_state(state, BlkState, what)
        check_int(what, "capacity", s.capacity, bits=64)
        if not isinstance(s.readonly, bool) or not isinstance(s.serial, str):
            raise StateError(f"restoring {what}", detail="readonly/serial of the wrong type")
        mine = self.state()
        if s != mine:
            raise StateError(f"restoring {what}",
                             detail=f"saved disk had {s.capacity} sectors ro={s.readonly} serial={s.serial!r}, "
                                    f"this one {mine.capacity} ro={mine.readonly} serial={mine.serial!r}")
        return s
