"""vhost-net's dirty log, for live migration: the pages the kernel writes into guest RAM (received
frames, used rings) while the guest runs on the source.

Those writes come from the vhost worker thread, through the memory table's userspace mapping:
KVM's dirty log never sees them (no vCPU stored anything) and neither does GuestMemory's own map
(kvmpy did not write them). So while a migration runs, each vhost instance gets a log
(<linux/vhost.h>, as QEMU's hw/virtio/vhost.c does it):

- VHOST_SET_LOG_BASE: the userspace address of a bitmap with one bit per VHOST_PAGE_SIZE (4 KiB)
  page of *guest-physical* address space from 0 up to the end of the highest RAM range; page p
  is bit p % 8 of byte p // 8, set by the kernel with an atomic set_bit;
- VHOST_F_LOG_ALL added to the acked features: every write into a guest buffer is logged;
- VHOST_SET_VRING_ADDR with VHOST_VRING_F_LOG and log_guest_addr = the used ring's guest-physical
  address: the used ring's writes are logged too.

The log is one anonymous mapping shared by every vhost instance of the machine (the kernel sets
bits atomically, so sharing loses nothing). DirtyTracker.sync takes it (`take_into`): each
8-byte word is read and zeroed in one atomic exchange (kvmpy_dirty_take, the C helper block
migration uses for its map), so a bit the kernel sets meanwhile lands in this take or stays for
the next; the page then goes into the tracker's pending set, which is cleared just before the
page is copied: the same "mark after the write, clear before the copy" order that keeps every
other dirty source correct. At the switchover the guest is paused, which stops the vhost rings
(VhostNetOffload.stop), so the last take sees every write.

The arithmetic (`log_size`, `merge_log`) is pure and tier-0 tested; `VhostLogBuffer` is the
memory; `VhostDirtyLog` is DirtyTracker's extra log over a machine's vhost offloads.
"""
from __future__ import annotations

import logging
import mmap
from typing import TYPE_CHECKING, Protocol, Sequence

from kvmpy.memslots.layout import PAGE_SIZE, RamRange

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

VHOST_PAGE_SIZE = 0x1000        # <linux/vhost_types.h>: the log's page, whatever the host's page size
VHOST_VRING_F_LOG = 0           # bit of vhost_vring_addr.flags: log the used ring at log_guest_addr
LOG_WORD_BYTES = 8              # the kernel's set_bit works on longs; the take exchanges u64 words

assert PAGE_SIZE == VHOST_PAGE_SIZE, "a page of the vhost log must be a page of the dirty tracker"


def log_size(ranges: Sequence[RamRange]) -> int:
    """Bytes of a log covering every RAM range: a bit per page of guest-physical address space
    from 0 to the end of the highest range (the hole below 4 GiB included: the kernel indexes the
    log by guest-physical address), in whole u64 words. The kernel refuses VHOST_F_LOG_ALL (EFAULT)
    when the log does not cover every region of the memory table."""
    end = max((r.gpa + r.size for r in ranges), default=0)
    pages = -(-end // VHOST_PAGE_SIZE)
    return -(-pages // (8 * LOG_WORD_BYTES)) * LOG_WORD_BYTES


def log_pages(log_bytes: "np.ndarray") -> "np.ndarray":
    """Guest-physical page numbers of the set bits (bit i of byte j = page 8*j + i), sorted."""
    import numpy as np
    nonzero = np.flatnonzero(log_bytes)
    if not nonzero.size:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(log_bytes[nonzero].reshape(-1, 1), axis=1, bitorder="little").astype(bool)
    return (nonzero.astype(np.int64)[:, None] * 8 + np.arange(8, dtype=np.int64))[bits]


def merge_log(log_bytes: "np.ndarray", ranges: Sequence[RamRange], pending: Sequence["np.ndarray"]) -> int:
    """Mark in `pending` (a bool per page of each RAM range, as DirtyTracker keeps it) every page
    the log names: guest-physical page p of range r is pending[r][p - r.gpa // PAGE_SIZE]. Bits
    outside RAM (the device hole; a log larger than RAM) name no page and are dropped. Returns how
    many logged pages fell in RAM."""
    pages = log_pages(log_bytes)
    if not pages.size:
        return 0
    count = 0
    for r, marks in zip(ranges, pending):
        first = r.gpa // PAGE_SIZE
        inside = pages[(pages >= first) & (pages < first + len(marks))] - first
        marks[inside] = True
        count += int(inside.size)
    return count


class VhostLogBuffer:
    """The log's memory: an anonymous mapping (page-aligned, so every u64 word is aligned for the
    kernel's set_bit and for the atomic exchange), `address` for VHOST_SET_LOG_BASE, `take()`
    for the tracker. It must stay mapped while any vhost instance may still log into it."""

    def __init__(self, size: int):
        from kvmpy.ioctl._kvm import ffi, lib
        self.size = size
        self._map = mmap.mmap(-1, max(-(-size // mmap.PAGESIZE) * mmap.PAGESIZE, mmap.PAGESIZE))
        self._ffi, self._take = ffi, lib.kvmpy_dirty_take
        self._c = ffi.from_buffer("uint8_t[]", self._map, require_writable=True)
        self.address = int(ffi.cast("uintptr_t", self._c))

    def take(self) -> "np.ndarray":
        """The log's bytes, zeroed in the same step (word by word, atomically): read the pages
        it names after this call, never before."""
        import numpy as np
        out = np.zeros(self.size, dtype=np.uint8)
        if self.size:
            self._take(self._c, self._ffi.from_buffer("uint8_t[]", out, require_writable=True), self.size)
        return out

    def close(self) -> None:
        if self._map is not None:
            self._c = None
            self._map.close()
            self._map = None


class LoggingOffload(Protocol):
    """What a kernel data path needs to log its writes (kvmpy.vhost.net.VhostNetOffload)."""

    def set_log(self, log_address: int | None) -> None: ...


class VhostDirtyLog:
    """DirtyTracker's extra log (kvmpy.memslots.dirty.ExtraDirtyLog) over a machine's vhost
    offloads: `start` gives each the log, `take_into` merges it at every sync, `stop` takes it
    back (a finished, failed or cancelled migration). `pages_logged` counts what it merged."""

    def __init__(self, offloads: Sequence[LoggingOffload], ranges: Sequence[RamRange]):
        self.offloads, self.ranges = list(offloads), list(ranges)
        self.buffer: VhostLogBuffer | None = None
        self._given: list[LoggingOffload] = []
        self.pages_logged = 0

    def start(self) -> None:
        """Every offload logs from now on; on a failure the ones already logging stop again."""
        self.stop()
        self.buffer = VhostLogBuffer(log_size(self.ranges))
        self.pages_logged = 0
        try:
            for offload in self.offloads:
                self._given.append(offload)         # before: a half-done set_log is undone too
                offload.set_log(self.buffer.address)
        except BaseException:
            self.stop()
            raise

    def take_into(self, pending: Sequence["np.ndarray"]) -> int:
        """Move the logged pages into `pending` (DirtyTracker's per-range bool arrays)."""
        if self.buffer is None:
            return 0
        count = merge_log(self.buffer.take(), self.ranges, pending)
        self.pages_logged += count
        return count

    def stop(self) -> None:
        """Switch logging off. The log is unmapped only when every offload said it stopped: one
        that failed to may still write there, so its memory is left mapped (a few KiB) rather
        than handed to whatever mmap gives that address next."""
        from kvmpy.errors import KvmpyError
        failed = False
        for offload in self._given:
            try:
                offload.set_log(None)
            except KvmpyError as exc:
                failed = True
                log.warning("switching vhost-net's dirty log off: %s", exc)
        self._given = []
        if self.buffer is not None:
            if self.pages_logged:
                log.info("vhost dirty log: %d page(s) written by vhost-net during the migration", self.pages_logged)
            if not failed:
                self.buffer.close()
            self.buffer = None
