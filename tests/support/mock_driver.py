"""Driver side of virtio, for tests: lays out split queues in a GuestMemory, queues buffers,
reads the used ring, and drives a VirtioPciDevice through its config space and BAR0 like a
guest kernel would. Also offers raw pokes so tests can build hostile rings.
"""
from __future__ import annotations

import struct

from kvmpy.devices.pci.config import CAP_ID_VENDOR, PCI_CAPABILITY_LIST, PciFunction
from kvmpy.devices.virtio.device import (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
                                         STATUS_FEATURES_OK)
from kvmpy.devices.virtio.queue import (VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
                                        VIRTQ_DESC_F_WRITE)
from kvmpy.memslots import GuestMemory

_DESC = struct.Struct("<QIHH")

Segment = tuple[int, int, bool]  # (gpa, length, device-writable)


class BumpAllocator:
    """Hands out aligned guest-physical ranges from [start, end) for test buffers."""

    def __init__(self, start: int, end: int):
        self.next, self.end = start, end

    def alloc(self, size: int, align: int = 16) -> int:
        addr = (self.next + align - 1) & ~(align - 1)
        if addr + size > self.end:
            raise MemoryError(f"test allocator exhausted ({size} bytes)")
        self.next = addr + size
        return addr


class MockQueue:
    """The driver's view of one split queue at `base` (descriptor table, avail, used)."""

    def __init__(self, mem: GuestMemory, base: int, size: int):
        self.mem, self.size = mem, size
        self.desc_addr = base
        self.avail_addr = base + 16 * size
        self.used_addr = (self.avail_addr + 6 + 2 * size + 3) & ~3
        self.end = self.used_addr + 6 + 8 * size
        mem.fill(base, self.end - base, 0)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self._chains: dict[int, list[int]] = {}

    # raw pokes for hostile tests
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        base = self.desc_addr if table is None else table
        self.mem.write(base + 16 * i, _DESC.pack(addr & (2**64 - 1), length & 0xFFFFFFFF, flags, nxt & 0xFFFF))

    def publish(self, head: int, count: int = 1) -> None:
        """Put `head` in the avail ring and advance avail idx by `count` (normally 1)."""
        self.mem.write_u16(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), head & 0xFFFF)
        self.set_avail_idx(self.avail_idx + count)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.avail_addr + 2, self.avail_idx)

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write_u16(self.avail_addr, VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0)

    def set_used_event(self, idx: int) -> None:
        self.mem.write_u16(self.avail_addr + 4 + 2 * self.size, idx & 0xFFFF)

    @property
    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_addr + 4 + 8 * self.size)

    # normal use
    def add(self, segments: list[Segment], indirect_at: int | None = None) -> int:
        """Queue a chain; readable segments must come first. With `indirect_at`, the chain is
        written as an indirect table at that GPA and one ring descriptor points to it."""
        if indirect_at is not None:
            for i, (addr, length, w) in enumerate(segments):
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(segments) else 0)
                self.write_desc(i, addr, length, flags, i + 1, table=indirect_at)
            head = self.free.pop(0)
            self.write_desc(head, indirect_at, 16 * len(segments), VIRTQ_DESC_F_INDIRECT)
            self._chains[head] = [head]
        else:
            if len(segments) > len(self.free):
                raise MemoryError("mock queue full")
            ids = [self.free.pop(0) for _ in segments]
            for i, (addr, length, w) in enumerate(segments):
                last = i + 1 == len(segments)
                flags = (VIRTQ_DESC_F_WRITE if w else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
                self.write_desc(ids[i], addr, length, flags, 0 if last else ids[i + 1])
            head = ids[0]
            self._chains[head] = ids
        self.publish(head)
        return head

    def used(self) -> list[tuple[int, int]]:
        """New (head, written length) entries since the last call; their descriptors are freed."""
        idx = self.mem.read_u16(self.used_addr + 2)
        out = []
        while self.last_used != idx:
            off = self.used_addr + 4 + 8 * (self.last_used % self.size)
            head, length = self.mem.read_u32(off), self.mem.read_u32(off + 4)
            out.append((head, length))
            self.free.extend(self._chains.pop(head, []))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out


class MockPciDriver:
    """Finds the virtio capabilities of a VirtioPciDevice and talks to BAR0 directly."""

    def __init__(self, dev: PciFunction, mem: GuestMemory, alloc: BumpAllocator):
        self.dev, self.mem, self.alloc = dev, mem, alloc
        self.caps: dict[int, tuple[int, int, int]] = {}  # cfg_type -> (cap offset, bar offset, length)
        self.queues: dict[int, MockQueue] = {}
        off = dev.config_read(PCI_CAPABILITY_LIST, 1)
        seen = 0
        while off and seen < 48:
            if dev.config_read(off, 1) == CAP_ID_VENDOR:
                cfg_type = dev.config_read(off + 3, 1)
                self.caps.setdefault(cfg_type, (off, dev.config_read(off + 8, 4), dev.config_read(off + 12, 4)))
            off = dev.config_read(off + 1, 1)
            seen += 1

    def _base(self, cfg_type: int) -> int:
        return self.caps[cfg_type][1]

    def read(self, cfg_type: int, offset: int, size: int) -> int:
        return int.from_bytes(self.dev.bar_read(0, self._base(cfg_type) + offset, size), "little")

    def write(self, cfg_type: int, offset: int, size: int, value: int) -> None:
        self.dev.bar_write(0, self._base(cfg_type) + offset, value.to_bytes(size, "little"))

    def status(self) -> int:
        return self.read(1, 0x14, 1)

    def set_status(self, value: int) -> None:
        self.write(1, 0x14, 1, value)

    def device_features(self) -> int:
        lo = (self.write(1, 0x00, 4, 0), self.read(1, 0x04, 4))[1]
        hi = (self.write(1, 0x00, 4, 1), self.read(1, 0x04, 4))[1]
        return lo | hi << 32

    def negotiate(self, features: int | None = None) -> bool:
        """Reset, ACK, DRIVER, write features (default: all offered), FEATURES_OK; True if accepted."""
        self.set_status(0)
        self.set_status(STATUS_ACKNOWLEDGE)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        feats = self.device_features() if features is None else features
        for sel in (0, 1):
            self.write(1, 0x08, 4, sel)
            self.write(1, 0x0C, 4, (feats >> (32 * sel)) & 0xFFFFFFFF)
        self.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        return bool(self.status() & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None, vector: int | None = None) -> MockQueue:
        self.write(1, 0x16, 2, index)
        size = size or self.read(1, 0x18, 2)
        q = MockQueue(self.mem, self.alloc.alloc(16 * size + 8 * size + 2 * size + 32, 4096), size)
        self.write(1, 0x18, 2, size)
        if vector is not None:
            self.write(1, 0x1A, 2, vector)
        for off, addr in ((0x20, q.desc_addr), (0x28, q.avail_addr), (0x30, q.used_addr)):
            self.write(1, off, 4, addr & 0xFFFFFFFF)  # two halves, like Linux's vp_iowrite64_twopart
            self.write(1, off + 4, 4, addr >> 32)
        self.write(1, 0x1C, 2, 1)
        self.queues[index] = q
        return q

    def driver_ok(self) -> None:
        self.set_status(self.status() | STATUS_DRIVER_OK)

    def start(self, num_queues: int, features: int | None = None, msix: bool = False) -> list[MockQueue]:
        """The whole probe sequence; with `msix`, queue i uses vector i+1, config vector 0."""
        if not self.negotiate(features):
            raise RuntimeError("device rejected features")
        if msix:
            self.enable_msix()
            self.write(1, 0x10, 2, 0)
        qs = [self.setup_queue(i, vector=(i + 1) if msix else None) for i in range(num_queues)]
        self.driver_ok()
        return qs

    def enable_msix(self) -> None:
        msix = self.dev.msix  # type: ignore[attr-defined]
        for v in range(msix.num_vectors):
            base = msix.table_offset + 16 * v
            self.dev.bar_write(0, base, struct.pack("<I", 0xFEE00000))
            self.dev.bar_write(0, base + 4, struct.pack("<I", 0))
            self.dev.bar_write(0, base + 8, struct.pack("<I", 0x40 + v))
            self.dev.bar_write(0, base + 12, struct.pack("<I", 0))
        ctrl = self.dev.config_read(msix.cap_offset + 2, 2)
        self.dev.config_write(msix.cap_offset + 2, 2, ctrl | 0x8000)

    def notify(self, index: int) -> None:
        mult = self.dev.config_read(self.caps[2][0] + 16, 4)
        self.write(2, mult * index, 2, index)

    def read_isr(self) -> int:
        return self.read(3, 0, 1)

    def config(self, offset: int, size: int) -> int:
        return self.read(4, offset, size)
