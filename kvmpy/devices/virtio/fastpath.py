"""The virtqueue walker and virtio-blk request loop in C (kvmpy/ioctl/vqfast.c), bound by cffi.

Why: per-request Python CPU bounds virtio-blk when Python runs slowly (about 10x slower in the
nested harness's L1): a 1 MiB request is ~254 descriptors to walk, slice and hand to preadv.
The C code does exactly what `Virtqueue.pop` and VirtioBlk's plain read/write path do, with the
GIL released; every other request is handed back to the Python code, which stays the reference.
`ENABLED` (environment KVMPY_VIRTIO_C=0 turns it off) is the default for new queues and devices;
tests flip it, or pass `fast=`, to run both paths.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

from kvmpy.errors import DeviceError
from kvmpy.memslots import GuestMemory

if TYPE_CHECKING:
    from kvmpy.devices.virtio.queue import DescChain, Virtqueue

try:
    from kvmpy.ioctl._kvm import ffi, lib
    AVAILABLE = hasattr(lib, "kvmpy_blk_run") and hasattr(lib, "kvmpy_vq_pop")
except ImportError:  # an unbuilt checkout: the Python path still works
    ffi = lib = None
    AVAILABLE = False

ENABLED = AVAILABLE and os.environ.get("KVMPY_VIRTIO_C", "1") != "0"

_vq_pop = lib.kvmpy_vq_pop if AVAILABLE else None
_unpack = ffi.unpack if AVAILABLE else None

# return codes of kvmpy_vq_pop / kvmpy_blk_run
EMPTY, CHAIN, NOTE, ERROR = (lib.KVMPY_VQ_EMPTY, lib.KVMPY_VQ_CHAIN, lib.KVMPY_VQ_NOTE,
                             lib.KVMPY_VQ_ERROR) if AVAILABLE else (0, 1, 2, -1)


def wanted(fast: bool | None) -> bool:
    """A constructor's `fast` flag: None follows ENABLED; True insists on the C path."""
    if fast is None:
        return ENABLED
    if fast and not AVAILABLE:
        raise DeviceError("selecting the virtio C data path",
                          detail="kvmpy.ioctl._kvm has no kvmpy_blk_run; rebuild it (pip install -e .)")
    return bool(fast)


def _pointer(view: memoryview) -> Any:
    """A uint8_t * to `view`'s first byte. The buffer export is dropped at once: a memoryview
    that still has exports when the garbage collector clears it crashes CPython 3.11 later
    (memory_clear drops its managed buffer, then memory_dealloc dereferences it)."""
    return ffi.cast("uint8_t *", int(ffi.cast("uintptr_t", ffi.from_buffer(view, require_writable=True))))


class CRing:
    """C view of one activated split ring: host pointers to its three parts and to every RAM
    range, and scratch space for one chain (at most 2*size - 1 segments: ring part plus
    indirect table). The views in `_anchors` keep the mappings from being unmapped under C
    (GuestMemory.close cannot unmap a mapping that views still reference)."""

    def __init__(self, mem: GuestMemory, desc: memoryview, avail: memoryview, used: memoryview,
                 size: int, event_idx: bool, indirect: bool):
        self._anchors = [mem.buffer(r.gpa, r.size) for r in mem.ranges] + [desc, avail, used]
        self._ram = ffi.new("struct kvmpy_ram[]", max(1, len(mem.ranges)))
        dirty_maps = getattr(mem, "dirty_maps", None) or [None] * len(mem.ranges)
        self._dirty = [ffi.from_buffer("uint8_t[]", m, require_writable=True) if m is not None else ffi.NULL
                       for m in dirty_maps]          # kept alive with the ring
        for slot, r, view, dirty in zip(self._ram, mem.ranges, self._anchors, self._dirty):
            slot.gpa, slot.size, slot.hva, slot.dirty = r.gpa, r.size, _pointer(view), dirty
        vq = self.vq = ffi.new("struct kvmpy_vq *")
        vq.desc, vq.avail, vq.used = _pointer(desc), _pointer(avail), _pointer(used)
        vq.ram, vq.nram, vq.size = self._ram, len(mem.ranges), size
        vq.event_idx, vq.indirect = event_idx, indirect
        n = 2 * size
        self._gpa, self._len = ffi.new("uint64_t[]", n), ffi.new("uint32_t[]", n)
        self._iov = ffi.new("struct iovec[]", n)
        ch = self.chain = ffi.new("struct kvmpy_chain *")
        ch.gpa, ch.len, ch.iov = self._gpa, self._len, self._iov

    def message(self) -> str:
        """Why the last call returned ERROR (the same words as the Python walker's)."""
        return ffi.string(self.vq.msg).decode(errors="replace")

    def pop(self, last_avail_idx: int) -> tuple[int, int]:
        """kvmpy_vq_pop from `last_avail_idx`: (return code, the new last_avail_idx)."""
        vq = self.vq
        vq.last_avail_idx = last_avail_idx
        return _vq_pop(vq, self.chain), vq.last_avail_idx

    def parts(self) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]], int, int]:
        """The chain C left in the scratch: head, readable and writable (gpa, len), their totals."""
        ch = self.chain
        n, nread = ch.nseg, ch.nread
        segs = list(zip(_unpack(self._gpa, n), _unpack(self._len, n)))
        return ch.head, segs[:nread], segs[nread:], ch.readable_len, ch.writable_len


def new_blk(capacity: int, readonly: bool) -> Any:
    """The C request loop's per-disk record (fds are copied in before every run)."""
    b = ffi.new("struct kvmpy_blk *")
    b.capacity, b.readonly, b.fd, b.direct_fd = capacity, readonly, -1, -1
    return b


def blk_process(q: "Virtqueue", ring: CRing, b: Any, handle: Callable[["DescChain"], int],
                note: Callable[[Any], None]) -> bool:
    """Run the C loop over `q` until the ring is empty; True if anything was pushed. Chains C
    hands back go through `handle` (VirtioBlk._handle) and are pushed here; `note` logs what a
    request C finished needs logged. The queue's indices are passed in and read back each time
    (Python owns them); a broken ring raises the QueueError the Python walker would."""
    vq = ring.vq
    pushed = False
    while True:
        vq.last_avail_idx, vq.used_idx = q.last_avail_idx, q.used_idx
        rc = lib.kvmpy_blk_run(vq, b, ring.chain)
        q.last_avail_idx, q.used_idx = vq.last_avail_idx, vq.used_idx
        if q.mem.tracking:      # C marked the buffers it wrote; the used ring is marked here
            q.mark_used_ring()
        pushed = pushed or b.pushed > 0
        if rc == EMPTY:
            return pushed
        if rc == CHAIN:
            chain = q.c_chain()
            q.push(chain, handle(chain))
            pushed = True
        elif rc == NOTE:
            note(b)
        else:
            raise q.c_error()
