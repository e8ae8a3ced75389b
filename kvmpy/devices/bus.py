"""Address-space buses: one per space (port I/O, MMIO), mapping [base, base+len) to a device.

A device is a pure state machine with `read(offset, size) -> bytes` and
`write(offset, data) -> None`; it never sees the vCPU or the VM. Overlapping ranges are refused.
Lookups are on the vCPU exit path, so they are a bisect over sorted bases, no allocation.
"""
from __future__ import annotations

import bisect
import logging
import threading
from typing import Protocol

from kvmpy.errors import BusError

log = logging.getLogger(__name__)

HIT_CACHE_LIMIT = 4096   # bounded: a guest can touch any number of MMIO addresses
_MISS = object()


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class Bus:
    """Sorted, non-overlapping ranges -> devices. Unclaimed reads return all-ones (like real
    hardware's floating bus); unclaimed writes are dropped."""

    def __init__(self, name: str, limit: int):
        self.name = name
        self.limit = limit
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []  # (base, end, device)
        self._lock = threading.Lock()
        self.unhandled = 0
        # addr -> (device, offset) or None: port-I/O exits hit a few dozen addresses over and
        # over, so a dict probe replaces the bisect on the exit path. Cleared on any change.
        self._hits: dict[int, tuple[BusDevice, int] | None] = {}

    def register(self, base: int, length: int, device: BusDevice) -> None:
        if length <= 0 or base < 0 or base + length > self.limit:
            raise BusError(f"registering {device!r} on {self.name} bus",
                           detail=f"range [{base:#x}, {base + length:#x}) is empty or out of bounds")
        end = base + length
        with self._lock:
            i = bisect.bisect_right(self._bases, base)
            if i > 0 and self._entries[i - 1][1] > base:
                b, e, d = self._entries[i - 1]
                raise BusError(f"registering {device!r} on {self.name} bus",
                               detail=f"[{base:#x}, {end:#x}) overlaps {d!r} at [{b:#x}, {e:#x})")
            if i < len(self._entries) and self._entries[i][0] < end:
                b, e, d = self._entries[i]
                raise BusError(f"registering {device!r} on {self.name} bus",
                               detail=f"[{base:#x}, {end:#x}) overlaps {d!r} at [{b:#x}, {e:#x})")
            # Copy-on-write so lookups from vCPU threads never need the lock.
            bases = list(self._bases)
            entries = list(self._entries)
            bases.insert(i, base)
            entries.insert(i, (base, end, device))
            self._entries, self._bases = entries, bases
            self._hits = {}

    def unregister(self, base: int) -> BusDevice:
        with self._lock:
            i = bisect.bisect_left(self._bases, base)
            if i == len(self._bases) or self._bases[i] != base:
                raise BusError(f"unregistering from {self.name} bus", detail=f"nothing at {base:#x}")
            entries = list(self._entries)
            bases = list(self._bases)
            dev = entries.pop(i)[2]
            bases.pop(i)
            self._entries, self._bases = entries, bases
            self._hits = {}
            return dev

    def lookup(self, addr: int) -> tuple[BusDevice, int] | None:
        """(device, offset) for an address, or None."""
        hits = self._hits  # taken first: a result computed before a change lands in the old dict
        try:
            return hits[addr]
        except KeyError:
            pass
        hit = self._search(addr)
        if len(hits) < HIT_CACHE_LIMIT:
            hits[addr] = hit
        return hit

    def _search(self, addr: int) -> tuple[BusDevice, int] | None:
        entries = self._entries
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0:
            base, end, dev = entries[i]
            if addr < end:
                return dev, addr - base
        return None

    def read(self, addr: int, size: int) -> bytes:
        hit = self._hits.get(addr, _MISS)
        if hit is _MISS:
            hit = self.lookup(addr)
        if hit is None:
            self.unhandled += 1
            return b"\xff" * size
        dev, off = hit
        return dev.read(off, size)

    def write(self, addr: int, data: bytes) -> None:
        hit = self._hits.get(addr, _MISS)
        if hit is _MISS:
            hit = self.lookup(addr)
        if hit is None:
            self.unhandled += 1
            return
        dev, off = hit
        dev.write(off, data)

    def devices(self) -> list[tuple[int, int, BusDevice]]:
        return list(self._entries)


class CountingBus(Bus):
    """A Bus that also counts accesses per address (for `kvmpy boot --stats`: where the exits
    go). Kept out of the plain Bus so the exit path pays nothing when statistics are off."""

    def __init__(self, name: str, limit: int):
        super().__init__(name, limit)
        self.counts: dict[tuple[str, int], int] = {}

    def read(self, addr: int, size: int) -> bytes:
        key = ("r", addr)
        self.counts[key] = self.counts.get(key, 0) + 1
        return super().read(addr, size)

    def write(self, addr: int, data: bytes) -> None:
        key = ("w", addr)
        self.counts[key] = self.counts.get(key, 0) + 1
        super().write(addr, data)

    def top(self, n: int = 10) -> list[tuple[str, int, int, str]]:
        """[(r|w, address, count, device name)] most frequent first."""
        rows = []
        for (kind, addr), count in sorted(self.counts.items(), key=lambda kv: -kv[1])[:n]:
            hit = self.lookup(addr)
            rows.append((kind, addr, count, repr(hit[0]) if hit else "(unclaimed)"))
        return rows
