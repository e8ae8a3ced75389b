"""Block migration (QEMU's `block` capability, `migrate -b`): every writable local disk copied to
the destination alongside guest RAM, so the two hosts need no shared storage.

Source (BlockCopy, driven by kvmpy.migrate.precopy when the capability is on):
  setup    a DISK SETUP section lists the writable drives (index, block size, image bytes); the
           destination checks them and answers ACCEPT or REFUSE before any block moves
  bulk     every drive's image from start to end, while both virtio-blk data paths mark the
           blocks the guest writes (kvmpy.devices.virtio.blkdirty); holes (SEEK_DATA) and zero
           blocks go as ZERO runs, which carry no data
  passes   alongside each memory pass, the blocks marked since: the mark is taken (cleared)
           before the block is read, so a write either precedes the read or marks it again
  switch   with the guest paused and the disks flushed, the last marked blocks before STATE:
           the destination's image then equals the source's byte for byte
Read-only drives are not copied (nothing can change them; both sides open their own file).

The destination's images must exist with the same size (the same `--drive` flags on both
sides; `truncate -s SIZE` makes an empty sparse one): it never creates or resizes an image, so a
mistyped path or a size mismatch is one refusal line, not a new file or a truncated disk. Each
side needs its *own* image: a destination image whose lock another VM holds (the source's,
on shared storage) is refused, since copying onto the running source's disk would corrupt it.

DISK section payload (kvmpy.migrate.stream.DISK_HEADER, versioned by its first byte):
  SETUP  := u8 1  u8 0  u16 count  u32 0      count * (u64 image bytes  u32 drive  u32 block size)
  BLOCKS := u8 1  u8 1  u16 drive  u32 nruns  nruns * (u64 offset  u32 length  u32 flags)  data
A run is 512-byte aligned, 1..DISK_CHUNK_BYTES long and inside the image; flags ZERO (1) marks a
run of zeros (no data); the data of the other runs follows in order and must add up exactly.
Every run of a BLOCKS section is checked before any byte is written: a corrupt section never
writes past the image or into a drive the SETUP did not name.
"""
from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from kvmpy.errors import MigrationError
from kvmpy.migrate.stream import DISK_CHUNK_BYTES, DISK_HEADER, DISK_RUN, MAX_DISK_RUNS, StreamWriter

log = logging.getLogger(__name__)

DISK_VERSION = 1
SETUP, BLOCKS = 0, 1
ZERO = 1
SECTOR = 512
_FALLOC_KEEP_SIZE, _FALLOC_PUNCH_HOLE, _FALLOC_ZERO_RANGE = 0x01, 0x02, 0x10


# -- the section codec ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DiskSetup:
    drives: tuple[tuple[int, int, int], ...]     # (drive index, block size, image bytes)


@dataclass(frozen=True)
class DiskBlocks:
    drive: int
    runs: tuple[tuple[int, int, bool], ...]      # (byte offset, length, zero)
    data: memoryview = field(repr=False)          # the non-zero runs' bytes, in order


def encode_setup(drives: Sequence[tuple[int, int, int]]) -> bytes:
    if len(drives) > MAX_DISK_RUNS:
        raise MigrationError("block migration", detail=f"{len(drives)} drives (at most {MAX_DISK_RUNS})")
    body = b"".join(DISK_RUN.pack(image_bytes, index, block_size) for index, block_size, image_bytes in drives)
    return DISK_HEADER.pack(DISK_VERSION, SETUP, len(drives), 0) + body


def encode_blocks(drive: int, runs: Sequence[tuple[int, int, bool]]) -> bytes:
    """The header and run table of a BLOCKS section; its data follows as separate parts."""
    table = b"".join(DISK_RUN.pack(offset, length, ZERO if zero else 0) for offset, length, zero in runs)
    return DISK_HEADER.pack(DISK_VERSION, BLOCKS, drive, len(runs)) + table


def decode_disk(payload: bytes | memoryview) -> DiskSetup | DiskBlocks:
    """A DISK payload, checked for shape (sizes against the images are the receiver's)."""
    view = memoryview(payload).cast("B")
    if len(view) < DISK_HEADER.size:
        raise _corrupt(f"a DISK section of {len(view)} bytes")
    version, kind, number, nruns = DISK_HEADER.unpack_from(view)
    if version != DISK_VERSION:
        raise MigrationError("reading the migration stream",
                             detail=f"DISK section version {version} (this kvmpy reads {DISK_VERSION})")
    if kind == SETUP:
        if nruns or len(view) != DISK_HEADER.size + number * DISK_RUN.size or number > MAX_DISK_RUNS:
            raise _corrupt(f"a DISK SETUP of {number} drives in {len(view)} bytes")
        drives = []
        for i in range(number):
            image_bytes, drive, block_size = DISK_RUN.unpack_from(view, DISK_HEADER.size + i * DISK_RUN.size)
            if drive > 0xFFFF or block_size < SECTOR or block_size & (block_size - 1) or image_bytes % SECTOR:
                raise _corrupt(f"DISK SETUP entry {i}: drive {drive:#x} block size {block_size} "
                               f"bytes {image_bytes}")
            drives.append((drive, block_size, image_bytes))
        if len({d[0] for d in drives}) != len(drives):
            raise _corrupt("a DISK SETUP names a drive twice")
        return DiskSetup(tuple(drives))
    if kind != BLOCKS:
        raise _corrupt(f"DISK section type {kind}")
    table_end = DISK_HEADER.size + nruns * DISK_RUN.size
    if not 1 <= nruns <= MAX_DISK_RUNS or table_end > len(view):
        raise _corrupt(f"DISK BLOCKS with {nruns} runs in {len(view)} bytes")
    runs = []
    covered = data_bytes = 0
    for i in range(nruns):
        offset, length, flags = DISK_RUN.unpack_from(view, DISK_HEADER.size + i * DISK_RUN.size)
        if flags & ~ZERO or not length or offset % SECTOR or length % SECTOR:
            raise _corrupt(f"DISK BLOCKS run {i}: offset {offset} length {length} flags {flags:#x}")
        covered += length
        data_bytes += 0 if flags & ZERO else length
        runs.append((offset, length, bool(flags & ZERO)))
    if covered > DISK_CHUNK_BYTES:
        raise _corrupt(f"DISK BLOCKS covering {covered} bytes (at most {DISK_CHUNK_BYTES})")
    if data_bytes != len(view) - table_end:
        raise _corrupt(f"DISK BLOCKS: runs of {data_bytes} bytes of data but {len(view) - table_end} bytes")
    return DiskBlocks(number, tuple(runs), view[table_end:])


def _corrupt(detail: str) -> MigrationError:
    return MigrationError("reading the migration stream", detail=f"{detail} (corrupt stream)")


# -- the source -------------------------------------------------------------------------------------
class SourceDisk(Protocol):
    """A writable drive as BlockCopy needs it (live.py adapts VirtioBlk; tier 0 fakes it)."""
    index: int                  # position among the machine's --drive options
    path: str
    fd: int                     # readable with pread
    image_bytes: int

    def start_dirty_tracking(self) -> Any: ...     # a blkdirty.DirtyBlocks, fresh and clean
    def stop_dirty_tracking(self) -> None: ...


def _pread_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    while view:
        try:
            got = os.preadv(fd, [view], offset)
        except OSError as exc:
            raise MigrationError(f"reading {path} for block migration", errno=exc.errno) from None
        if got <= 0:
            raise MigrationError(f"reading {path} for block migration", detail=f"the image ends at {offset}")
        view, offset = view[got:], offset + got


def _data_from(fd: int, offset: int) -> int | None:
    """Where data starts at or after `offset` (SEEK_DATA); None past the last data; `offset`
    itself where the filesystem cannot tell (then the chunk is read and scanned)."""
    try:
        return os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        return None if exc.errno == errno.ENXIO else offset


class BlockCopy:
    """The source's side: setup(), start(), bulk_pass(), then sync()/dirty_pass() per memory
    pass, dirty_pass() once more at switchover, stop() in every case. `stats()` is query-migrate's
    `disk` (QEMU's transferred/remaining/total in bytes)."""

    def __init__(self, disks: Sequence[SourceDisk]):
        self.disks = list(disks)
        self.total = sum(d.image_bytes for d in self.disks)
        self.transferred = 0            # DISK section bytes sent (headers included)
        self.data_bytes = 0             # image bytes sent as data (not zero runs)
        self._bulk_left = self.total    # what the bulk pass has not reached yet
        self._dirty_bytes = 0           # at the last sync()
        self._maps: list[Any] = []
        self.bulk_done = False

    def stats(self) -> dict[str, int]:
        return {"transferred": self.transferred, "remaining": self._bulk_left + self._dirty_bytes,
                "total": self.total}

    def setup(self, writer: StreamWriter, read_reply: Callable[[], tuple[bytes, str]],
              accept: bytes, refuse: bytes) -> None:
        """Announce the drives; the destination's answer (REFUSE raises with its reason)."""
        from kvmpy.devices.virtio.blkdirty import BLOCK_SIZE
        self._send(writer, [encode_setup([(d.index, BLOCK_SIZE, d.image_bytes) for d in self.disks])])
        word, why = read_reply()
        if word == refuse:
            raise MigrationError("the destination refused the block migration", detail=why)
        if word != accept:
            raise MigrationError("the destination answered", detail=f"{word[:40]!r} instead of accepting the disks")

    def start(self) -> None:
        """Track every writable drive's writes from now on (before the bulk pass reads them)."""
        self._maps = [d.start_dirty_tracking() for d in self.disks]

    def stop(self) -> None:
        for d in self.disks:
            d.stop_dirty_tracking()

    def _send(self, writer: StreamWriter, parts: list[Any]) -> None:
        before = writer.bytes_written
        writer.write_disk(parts)
        self.transferred += writer.bytes_written - before

    def bulk_pass(self, writer: StreamWriter, check: Callable[[], None] = lambda: None) -> None:
        """Every drive's whole image, DISK_CHUNK_BYTES at a time (`check` between chunks)."""
        for disk, dirty in zip(self.disks, self._maps):
            block = dirty.block_size
            for offset in range(0, disk.image_bytes, DISK_CHUNK_BYTES):
                check()
                end = min(offset + DISK_CHUNK_BYTES, disk.image_bytes)
                data_at = _data_from(disk.fd, offset)
                if data_at is None or data_at >= end:           # a hole: nothing to read
                    self._send(writer, [encode_blocks(disk.index, [(offset, end - offset, True)])])
                else:
                    self._send_range(writer, disk, offset // block, -(-(end - offset) // block), block)
                self._bulk_left -= end - offset
        self.bulk_done = True

    def sync(self) -> int:
        """Bytes of blocks marked dirty now (they stay marked until a pass takes them)."""
        self._dirty_bytes = sum(m.count() * m.block_size for m in self._maps)
        return self._dirty_bytes

    def dirty_pass(self, writer: StreamWriter) -> int:
        """Send the blocks marked since the last take; the stream bytes it took."""
        before = self.transferred
        for disk, dirty in zip(self.disks, self._maps):
            mask = dirty.take()                 # cleared before the blocks are read
            block = dirty.block_size
            per_chunk = DISK_CHUNK_BYTES // block
            for first, count in _runs(mask):
                for start in range(first, first + count, per_chunk):
                    self._send_range(writer, disk, start, min(per_chunk, first + count - start), block)
        self._dirty_bytes = 0
        return self.transferred - before

    def _send_range(self, writer: StreamWriter, disk: SourceDisk, first: int, count: int, block: int) -> None:
        """Blocks [first, first+count) of `disk` (at most one chunk): read, zero blocks as ZERO runs."""
        import numpy as np
        offset = first * block
        end = min((first + count) * block, disk.image_bytes)
        if offset >= end:
            return
        buffer = bytearray(end - offset)
        _pread_all(disk.fd, memoryview(buffer), offset, disk.path)
        array = np.frombuffer(buffer, dtype=np.uint8)
        full = len(buffer) // block
        nonzero = np.zeros(-(-len(buffer) // block), dtype=bool)
        if full:
            nonzero[:full] = array[:full * block].reshape(full, block).any(axis=1)
        if len(buffer) % block:
            nonzero[full] = array[full * block:].any()
        runs: list[tuple[int, int, bool]] = []
        parts: list[Any] = []
        for start, n, is_data in _all_runs(nonzero):
            lo, hi = start * block, min((start + n) * block, len(buffer))
            runs.append((offset + lo, hi - lo, not is_data))
            if is_data:
                parts.append(memoryview(buffer)[lo:hi])
                self.data_bytes += hi - lo
        self._send(writer, [encode_blocks(disk.index, runs), *parts])


def _runs(mask: Any):
    """(first, count) of each run of True in a numpy bool array."""
    for start, n, is_set in _all_runs(mask):
        if is_set:
            yield start, n


def _all_runs(mask: Any):
    """(first, count, value) of each run of equal values in a numpy bool array."""
    import numpy as np
    if not mask.size:
        return
    edges = np.flatnonzero(np.diff(mask.view(np.int8))) + 1
    bounds = [0, *edges.tolist(), int(mask.size)]
    for lo, hi in zip(bounds, bounds[1:]):
        yield lo, hi - lo, bool(mask[lo])


# -- the destination -----------------------------------------------------------------------------------
class DestinationDisk(Protocol):
    """A drive of the destination as BlockReceiver needs it (live.py adapts VirtioBlk)."""
    index: int
    path: str
    fd: int                     # writable with pwrite
    image_bytes: int
    readonly: bool

    def claim(self) -> None: ...        # take the image's lock now, or raise (another VM has it)


class BlockReceiver:
    """The destination's side: `handle(payload)` for each DISK section, `finish()` before the
    destination confirms it loaded the guest. `reply(word, text)` answers the SETUP."""

    def __init__(self, disks: Sequence[DestinationDisk], reply: Callable[[bytes, str], None],
                 accept: bytes, refuse: bytes):
        self.disks = {d.index: d for d in disks}
        self._reply, self._accept, self._refuse = reply, accept, refuse
        self.copying: dict[int, DestinationDisk] = {}
        self.setup_done = False
        self.bytes_written = 0

    def handle(self, payload: bytes | memoryview) -> None:
        section = decode_disk(payload)
        if isinstance(section, DiskSetup):
            self._setup(section)
        else:
            self._blocks(section)

    def _setup(self, setup: DiskSetup) -> None:
        if self.setup_done:
            raise _corrupt("a second DISK SETUP")
        why = self._check_setup(setup)
        if why:
            self._reply(self._refuse, why)
            raise MigrationError("the block migration does not fit this machine", detail=why)
        self.setup_done = True
        self._reply(self._accept, "")

    def _check_setup(self, setup: DiskSetup) -> str:
        for index, _block, image_bytes in setup.drives:
            disk = self.disks.get(index)
            if disk is None:
                return f"the source copies drive {index}, which this machine does not have"
            if disk.readonly:
                return f"drive {index} ({disk.path}) is read-only here; the source copies it"
            if disk.image_bytes != image_bytes:
                return (f"drive {index} ({disk.path}) has {disk.image_bytes} bytes here, the source's "
                        f"{image_bytes}: create it with the same size")
            try:
                disk.claim()
            except MigrationError as exc:
                return str(exc)
            self.copying[index] = disk
        return ""

    def _blocks(self, blocks: DiskBlocks) -> None:
        if not self.setup_done:
            raise _corrupt("disk blocks before the DISK SETUP")
        disk = self.copying.get(blocks.drive)
        if disk is None:
            raise _corrupt(f"disk blocks for drive {blocks.drive}, which the SETUP did not name")
        for offset, length, _zero in blocks.runs:           # all checked before anything is written
            if offset > disk.image_bytes or length > disk.image_bytes - offset:
                raise _corrupt(f"disk blocks at {offset}+{length} beyond drive {blocks.drive}'s "
                               f"{disk.image_bytes} bytes")
        position = 0
        for offset, length, zero in blocks.runs:
            if zero:
                _write_zeroes(disk, offset, length)
            else:
                _pwrite_all(disk, blocks.data[position:position + length], offset)
                position += length
            self.bytes_written += length

    def finish(self) -> None:
        """Everything received is on the destination's disks (fdatasync), before LOADED."""
        for disk in self.copying.values():
            try:
                os.fdatasync(disk.fd)
            except OSError as exc:
                raise MigrationError(f"flushing {disk.path} after the block migration", errno=exc.errno) from None


def _pwrite_all(disk: DestinationDisk, data: memoryview, offset: int) -> None:
    while data:
        try:
            done = os.pwrite(disk.fd, data, offset)
        except OSError as exc:
            raise MigrationError(f"writing {disk.path} (block migration)", errno=exc.errno) from None
        data, offset = data[done:], offset + done


def _write_zeroes(disk: DestinationDisk, offset: int, length: int) -> None:
    """Zeros at [offset, offset+length): a hole where the filesystem punches one (a sparse image
    stays sparse), else an allocated zero range, else written zeros."""
    from kvmpy.devices.virtio.blk import fallocate
    for mode in (_FALLOC_PUNCH_HOLE | _FALLOC_KEEP_SIZE, _FALLOC_ZERO_RANGE | _FALLOC_KEEP_SIZE):
        try:
            fallocate(disk.fd, mode, offset, length)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENODEV):
                raise MigrationError(f"zeroing {disk.path} (block migration)", errno=exc.errno) from None
    zeros = memoryview(bytes(min(length, 1 << 20)))
    while length:
        n = min(length, len(zeros))
        _pwrite_all(disk, zeros[:n], offset)
        offset, length = offset + n, length - n
