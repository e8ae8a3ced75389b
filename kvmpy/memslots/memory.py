"""Guest RAM: one memfd, mapped once per RAM range, exposed as numpy uint8 arrays.

A memfd (not anonymous memory) so the same pages can later be handed to vhost, a second process
or a migration target by file descriptor. Every GPA access is bounds-checked: addresses come
from a possibly hostile guest. The core works on the mmaps directly; numpy is imported on the
first `view()`/`arrays` use, since importing it costs seconds under nested virtualization and
booting a guest needs none of it.
"""
from __future__ import annotations

import bisect
import ctypes
import mmap
import os
import struct

from typing import TYPE_CHECKING

from kvmpy.errors import GuestMemoryError, KvmpyError
from kvmpy.memslots.layout import PAGE_SIZE, RamRange, ram_ranges

if TYPE_CHECKING:
    import numpy as np


class GuestMemory:
    """All of the guest's RAM. `regions[i]` pairs a RamRange with its numpy view."""

    def __init__(self, ranges: list[RamRange], name: str = "kvmpy-guest-ram"):
        total = sum(r.size for r in ranges)
        try:
            self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
            os.ftruncate(self.fd, total)
        except OSError as e:
            raise KvmpyError("creating guest RAM memfd", errno=e.errno, detail=f"{total} bytes") from None
        self.size = total
        self.ranges = sorted(ranges, key=lambda r: r.gpa)
        self._maps: list[mmap.mmap] = []
        self._arrays: list[np.ndarray] | None = None
        self._addresses: list[int] = []
        for r in self.ranges:
            try:
                m = mmap.mmap(self.fd, r.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=r.offset)
            except OSError as e:
                self.close()
                raise KvmpyError("mapping guest RAM", errno=e.errno, detail=f"range at {r.gpa:#x}") from None
            self._maps.append(m)
            anchor = ctypes.c_char.from_buffer(m)
            self._addresses.append(ctypes.addressof(anchor))
            del anchor  # release the buffer export so close() can unmap
        self._starts = [r.gpa for r in self.ranges]

    @classmethod
    def create(cls, total: int) -> "GuestMemory":
        return cls(ram_ranges(total))

    # -- lookups -------------------------------------------------------------------------------
    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        """(region index, offset in region) for [gpa, gpa+length), which must lie in one range."""
        if gpa < 0 or length < 0:
            raise GuestMemoryError("guest memory access", detail=f"gpa={gpa:#x} len={length}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self.ranges[i]
            off = gpa - r.gpa
            if off + length <= r.size:
                return i, off
        raise GuestMemoryError("guest memory access",
                               detail=f"[{gpa:#x}, {gpa + length:#x}) is not inside guest RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._locate(gpa, length)
            return True
        except GuestMemoryError:
            return False

    def host_address(self, index: int) -> int:
        """Userspace address of RAM range `index` (for KVM_SET_USER_MEMORY_REGION)."""
        return self._addresses[index]

    @property
    def arrays(self) -> list["np.ndarray"]:
        """One numpy uint8 array per RAM range, sharing the guest's pages."""
        if self._arrays is None:
            import numpy as np
            self._arrays = [np.frombuffer(m, dtype=np.uint8) for m in self._maps]
        return self._arrays

    # -- access --------------------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> np.ndarray:
        """A zero-copy numpy view of guest RAM; writes to it land in the guest."""
        i, off = self._locate(gpa, length)
        return self.arrays[i][off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        i, off = self._locate(gpa, length)
        return self._maps[i][off:off + length]

    def write(self, gpa: int, data: "bytes | bytearray | memoryview | np.ndarray") -> None:
        buf = memoryview(data).cast("B")
        i, off = self._locate(gpa, len(buf))
        self._maps[i][off:off + len(buf)] = buf

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        i, off = self._locate(gpa, length)
        self._maps[i][off:off + length] = bytes((value,)) * length

    def read_u16(self, gpa: int) -> int:
        i, off = self._locate(gpa, 2)
        return struct.unpack_from("<H", self._maps[i], off)[0]

    def read_u32(self, gpa: int) -> int:
        i, off = self._locate(gpa, 4)
        return struct.unpack_from("<I", self._maps[i], off)[0]

    def read_u64(self, gpa: int) -> int:
        i, off = self._locate(gpa, 8)
        return struct.unpack_from("<Q", self._maps[i], off)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 2)
        struct.pack_into("<H", self._maps[i], off, value)

    def write_u32(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 4)
        struct.pack_into("<I", self._maps[i], off, value)

    def write_u64(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 8)
        struct.pack_into("<Q", self._maps[i], off, value)

    def buffer(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview for preadv/pwritev/recv_into straight into guest RAM."""
        i, off = self._locate(gpa, length)
        return memoryview(self._maps[i])[off:off + length]

    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def close(self) -> None:
        self._arrays = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with it
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
