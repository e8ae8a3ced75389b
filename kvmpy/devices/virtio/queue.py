"""Split virtqueue (virtio 1.2 section 2.7), device side, over a GuestMemory.

Everything in the rings is written by the guest, so every index, address, length and flag is
checked; a violation raises QueueError and the device marks itself DEVICE_NEEDS_RESET. The
pop/push path is the hot loop: struct formats are precompiled and the rings are read through
memoryviews cached at activation (the rings must each lie inside one RAM range); buffers in the
first RAM range (all of it for guests under 3 GiB) are bounds-checked inline, others by lookup.
With the C data path (fastpath.py) `pop` runs the same checks in C; this file stays the reference.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmpy.devices.virtio import fastpath
from kvmpy.ioctl._kvm import lib
from kvmpy.errors import DeviceError, StateError
from kvmpy.memslots import GuestMemory
from kvmpy.state import check_int, expect_state, versioned

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
MAX_CHAIN_BYTES = 1 << 32  # a chain's total length must fit the used ring's 32-bit len field

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


class QueueError(DeviceError):
    """The driver put something invalid in a virtqueue; the device must be reset."""


@dataclass(slots=True)
class DescChain:
    """One popped request: its head index and the guest (addr, len) segments, readable first."""
    head: int
    readable: list[tuple[int, int]]
    writable: list[tuple[int, int]]
    readable_len: int = 0
    writable_len: int = 0


def slice_segments(segs: list[tuple[int, int]], start: int, length: int) -> list[tuple[int, int]]:
    """The sub-list of (addr, len) segments covering bytes [start, start+length) of `segs`."""
    out: list[tuple[int, int]] = []
    pos = 0
    end = start + length
    for addr, n in segs:
        lo, hi = max(start, pos), min(end, pos + n)
        if lo < hi:
            out.append((addr + lo - pos, hi - lo))
        pos += n
        if pos >= end:
            break
    return out


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: has `event` been crossed moving the index from `old` to `new`?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@versioned("virtqueue", 1)
@dataclass
class VirtqueueState:
    """The queue registers and the device's ring positions. The rings themselves are guest RAM
    (migrated with it); the ring views are rebuilt on restore."""
    size: int
    ready: bool
    desc_addr: int
    avail_addr: int
    used_addr: int
    last_avail_idx: int
    used_idx: int
    signalled_used: int
    msix_vector: int
    event_idx: bool
    indirect: bool


class Virtqueue:
    """Device side of one split virtqueue. Registers (size, addresses) are set by the transport,
    then `activate()` validates them and caches views of the rings."""

    def __init__(self, mem: GuestMemory, index: int, max_size: int = 256, fast: bool | None = None):
        if not (0 < max_size <= MAX_QUEUE_SIZE and max_size & (max_size - 1) == 0):
            raise DeviceError("creating a virtqueue", detail=f"max size {max_size} is not a power of 2")
        self.mem = mem
        self.index = index
        self.max_size = max_size
        first = mem.ranges[0] if mem.ranges else None
        self._ram_lo, self._ram_hi = (first.gpa, first.gpa + first.size) if first else (0, 0)
        self.fast = fastpath.wanted(fast)
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.msix_vector = 0xFFFF
        self.event_idx = False
        self.indirect = False
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._used16: memoryview | None = None      # the used ring as u16s: idx [1], avail_event [2 + 4*size]
        self.cring: fastpath.CRing | None = None  # the C walker's view, while active with fast

    # -- activation ---------------------------------------------------------------------------
    def activate(self, event_idx: bool = False, indirect: bool = False) -> None:
        """Validate size and ring addresses (alignment, inside RAM) and cache the ring views."""
        size = self.size
        self.check_layout(size, self.desc_addr, self.avail_addr, self.used_addr)
        self._desc = self.mem.buffer(self.desc_addr, 16 * size)
        self._avail = self.mem.buffer(self.avail_addr, 6 + 2 * size)
        self._used = self.mem.buffer(self.used_addr, 6 + 8 * size)
        # The indices the driver polls are stored through this view, never struct.pack_into,
        # which zeroes a word before writing it: a vCPU reading used->idx then would see it go
        # back to 0 (Linux: "id N is not a head!"), and avail_event at 0 can swallow a kick.
        self._used16 = self._used.cast("H")
        self.event_idx = event_idx
        self.indirect = indirect
        self.cring = fastpath.CRing(self.mem, self._desc, self._avail, self._used, size, event_idx,
                                    indirect) if self.fast else None
        self.ready = True

    def check_layout(self, size: int, desc_addr: int, avail_addr: int, used_addr: int) -> None:
        """Raise QueueError unless these registers describe rings `activate` can use; touches
        nothing (restore checks a saved queue with it before changing anything)."""
        if not (0 < size <= self.max_size and size & (size - 1) == 0):
            raise QueueError(f"activating queue {self.index}", detail=f"size {size} is not a power of 2 <= {self.max_size}")
        for name, addr, align, length in (("descriptor table", desc_addr, 16, 16 * size),
                                          ("avail ring", avail_addr, 2, 6 + 2 * size),
                                          ("used ring", used_addr, 4, 6 + 8 * size)):
            if addr % align:
                raise QueueError(f"activating queue {self.index}", detail=f"{name} {addr:#x} not {align}-byte aligned")
            if not self.mem.contains(addr, length):
                raise QueueError(f"activating queue {self.index}",
                                 detail=f"ring outside guest RAM: {name} [{addr:#x}+{length}]")

    def deactivate(self) -> None:
        self._desc = self._avail = self._used = self._used16 = None
        self.cring = None
        self.ready = False

    # -- the hot path -------------------------------------------------------------------------
    def avail_idx(self) -> int:
        return _U16.unpack_from(self._avail, 2)[0]

    def has_pending(self) -> bool:
        return self._avail is not None and self.avail_idx() != self.last_avail_idx

    def pop(self) -> DescChain | None:
        """The next available chain, validated, or None when the ring is empty."""
        if self.cring is not None:
            return self._pop_c(self.cring)
        avail, used16 = self._avail, self._used16
        if avail is None or used16 is None:
            return None
        size = self.size
        pending = (_U16.unpack_from(avail, 2)[0] - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            if not self.event_idx:
                return None
            # Publish where we stopped, then look once more so a racing driver is not missed
            # (the fence keeps that load from passing the store).
            used16[2 + 4 * size] = self.last_avail_idx
            if self.mem.tracking:
                self.mark_used_ring()
            lib.kvmpy_mb()
            pending = (_U16.unpack_from(avail, 2)[0] - self.last_avail_idx) & 0xFFFF
            if pending == 0:
                return None
        if pending > size:
            raise QueueError(f"queue {self.index}", detail=f"avail index jumped {pending} entries ahead (size {size})")
        head = _U16.unpack_from(avail, 4 + 2 * (self.last_avail_idx & (size - 1)))[0]
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            used16[2 + 4 * size] = self.last_avail_idx
            if self.mem.tracking:
                self.mark_used_ring()
        return chain

    def _pop_c(self, ring: fastpath.CRing) -> DescChain | None:
        rc, self.last_avail_idx = ring.pop(self.last_avail_idx)
        if self.mem.tracking and self.event_idx:
            self.mark_used_ring()               # C published avail_event in the used ring
        if rc == fastpath.CHAIN:
            return DescChain(*ring.parts())
        if rc == fastpath.EMPTY:
            return None
        raise self.c_error()

    def c_chain(self) -> DescChain:
        """The chain the C walker popped last (also what the C blk loop hands back)."""
        assert self.cring is not None
        return DescChain(*self.cring.parts())

    def c_error(self) -> QueueError:
        """The QueueError for the C walker's last ERROR, worded as `_walk`'s."""
        assert self.cring is not None
        return QueueError(f"queue {self.index}", detail=self.cring.message())

    def _walk(self, head: int) -> DescChain:
        size = self.size
        if head >= size:
            raise QueueError(f"queue {self.index}", detail=f"head index {head} >= size {size}")
        contains = self.mem.contains
        unpack_desc = _DESC.unpack_from
        lo, hi = self._ram_lo, self._ram_hi
        table = self._desc
        table_len = size
        in_indirect = False
        idx = head
        count = 0
        total = 0
        wlen = 0
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        while True:
            if idx >= table_len:
                raise QueueError(f"queue {self.index}", detail=f"next index {idx} >= table length {table_len}")
            count += 1
            if count > table_len:
                raise QueueError(f"queue {self.index}", detail="descriptor chain loops or exceeds the table")
            addr, length, flags, nxt = unpack_desc(table, idx << 4)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect or in_indirect or flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError(f"queue {self.index}", detail=f"indirect descriptor not allowed here (flags {flags:#x})")
                if length == 0 or length & 15 or (length >> 4) > size:
                    raise QueueError(f"queue {self.index}", detail=f"indirect table length {length} invalid")
                if not contains(addr, length):
                    raise QueueError(f"queue {self.index}", detail=f"indirect table [{addr:#x}+{length}] outside RAM")
                table = self.mem.buffer(addr, length)
                table_len = length >> 4
                in_indirect = True
                idx = 0
                count = 0
                continue
            if not (lo <= addr and addr + length <= hi) and not contains(addr, length):
                raise QueueError(f"queue {self.index}", detail=f"buffer [{addr:#x}+{length}] outside RAM")
            total += length
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append((addr, length))
                wlen += length
            elif writable:
                raise QueueError(f"queue {self.index}", detail="readable descriptor after a writable one")
            else:
                readable.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                if total > MAX_CHAIN_BYTES:  # at most table_len * 4 GiB: checked once, at the end
                    raise QueueError(f"queue {self.index}", detail="chain longer than 4 GiB")
                return DescChain(head, readable, writable, total - wlen, wlen)
            idx = nxt

    def push(self, chain: DescChain, written: int) -> None:
        """Return a chain to the driver, saying how many bytes the device wrote into it."""
        used, used16 = self._used, self._used16
        if used is None or used16 is None:
            return
        written = max(0, min(written, chain.writable_len))
        # the element may be packed (zeroed first): the driver reads it only once idx covers it
        _USED_ELEM.pack_into(used, 4 + 8 * (self.used_idx & (self.size - 1)), chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        used16[1] = self.used_idx
        if self.mem.tracking:   # live migration: what the device wrote is complete now
            self.mark_written(chain)

    def mark_written(self, chain: DescChain) -> None:
        """Mark dirty (GuestMemory's userspace map) the chain's writable buffers and the used
        ring: the device wrote them through views KVM's dirty log cannot see."""
        mark = self.mem.mark_dirty
        for addr, length in chain.writable:
            mark(addr, length)
        self.mark_used_ring()

    def mark_used_ring(self) -> None:
        self.mem.mark_dirty(self.used_addr, 6 + 8 * self.size)

    def should_notify(self) -> bool:
        """After a batch of pushes: does the driver want an interrupt (EVENT_IDX/NO_INTERRUPT)?"""
        avail = self._avail
        if avail is None or self.used_idx == self.signalled_used:
            return False
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        lib.kvmpy_mb()  # the used index we published must be visible before we read used_event/flags
        if self.event_idx:
            return need_event(_U16.unpack_from(avail, 4 + 2 * self.size)[0], new, old)
        return not _U16.unpack_from(avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- state --------------------------------------------------------------------------------
    def state(self) -> VirtqueueState:
        return VirtqueueState(self.size, self.ready, self.desc_addr, self.avail_addr, self.used_addr,
                              self.last_avail_idx, self.used_idx, self.signalled_used, self.msix_vector,
                              self.event_idx, self.indirect)

    def check_state(self, state: object) -> VirtqueueState:
        """Validate without touching the queue: register widths as the transport exposes them,
        and for a ready queue rings `activate` accepts and no more chains in flight than fit."""
        what = f"queue {self.index}"
        s = expect_state(state, VirtqueueState, what)
        for name in ("size", "last_avail_idx", "used_idx", "signalled_used", "msix_vector"):
            check_int(what, name, getattr(s, name), bits=16)
        for name in ("desc_addr", "avail_addr", "used_addr"):
            check_int(what, name, getattr(s, name), bits=64)
        for name in ("ready", "event_idx", "indirect"):
            if not isinstance(getattr(s, name), bool):
                raise StateError(f"restoring {what}", detail=f"{name} is not a bool")
        if s.ready:
            try:
                self.check_layout(s.size, s.desc_addr, s.avail_addr, s.used_addr)
            except QueueError as e:
                raise StateError(f"restoring {what}", detail=e.detail) from None
        if ((s.last_avail_idx - s.used_idx) & 0xFFFF) > s.size:
            # the device can never have more chains in flight than the ring holds
            raise StateError(f"restoring {what}", detail="used index inconsistent with avail index")
        return s

    def restore(self, state: VirtqueueState) -> None:
        """Check, then load; a ready queue is re-activated (its ring views rebuilt)."""
        s = self.check_state(state)
        self.reset()
        self.size, self.desc_addr, self.avail_addr, self.used_addr = s.size, s.desc_addr, s.avail_addr, s.used_addr
        self.msix_vector = s.msix_vector
        if s.ready:
            self.activate(s.event_idx, s.indirect)
        else:
            self.event_idx, self.indirect = s.event_idx, s.indirect
        self.last_avail_idx, self.used_idx, self.signalled_used = s.last_avail_idx, s.used_idx, s.signalled_used
