"""Guest RAM, mapped once per RAM range, exposed as numpy uint8 arrays.

Backed by a memfd, so the same pages can be handed to vhost, a second process or a migration
target by file descriptor, whenever the kernel backs shmem with transparent huge pages; else by
anonymous memory (fd -1) with MADV_HUGEPAGE, because 4 KiB pages under nested paging are slow.
`backend="memfd"` forces sharing. Every GPA access is bounds-checked: addresses come
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


HUGE_PAGE = 2 << 20
BACKENDS = ("auto", "memfd", "anon")
SHMEM_THP = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"


def _address_of(buf: object) -> int:
    anchor = ctypes.c_char.from_buffer(buf)
    try:
        return ctypes.addressof(anchor)
    finally:
        del anchor  # drop the buffer export so the mapping can be closed later


def choose_backend(shmem_thp_path: str = SHMEM_THP) -> str:
    """memfd (shareable by fd) when the kernel gives shmem transparent huge pages; otherwise
    anonymous memory, which gets them. Under nested paging 4 KiB guest RAM costs whole seconds
    of boot time (measured: a stock kernel reached init 8 s later in L1 with memfd on 4 KiB)."""
    try:
        with open(shmem_thp_path) as f:
            mode = f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "anon"
    return "memfd" if mode in ("always", "within_size", "advise", "force") else "anon"


class GuestMemory:
    """All of the guest's RAM. `regions[i]` pairs a RamRange with its numpy view."""

    def __init__(self, ranges: list[RamRange], name: str = "kvmpy-guest-ram", backend: str = "auto"):
        if backend not in BACKENDS:
            raise KvmpyError("creating guest RAM", detail=f"backend {backend!r} is not one of {BACKENDS}")
        total = sum(r.size for r in ranges)
        self.backend = choose_backend() if backend == "auto" else backend
        self.fd = -1
        self.size = total
        self.ranges = sorted(ranges, key=lambda r: r.gpa)
        self._mmaps: list[mmap.mmap] = []
        self._maps: list[memoryview] = []      # each range's bytes (a 2 MiB-aligned window)
        self._arrays: list[np.ndarray] | None = None
        self._addresses: list[int] = []
        try:
            if self.backend == "memfd":
                self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
                os.ftruncate(self.fd, total)
            for r in self.ranges:
                self._map_range(r)
        except OSError as e:
            self.close()
            raise KvmpyError(f"creating guest RAM ({self.backend})", errno=e.errno,
                             detail=f"{total} bytes") from None
        self._starts = [r.gpa for r in self.ranges]

    def _map_range(self, r: RamRange) -> None:
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        if self.backend == "memfd":
            m = mmap.mmap(self.fd, r.size, mmap.MAP_SHARED, prot, offset=r.offset)
            skip = 0
        else:
            # Over-allocate by one huge page and use the aligned window, so guest-physical 2 MiB
            # frames sit on host 2 MiB frames and KVM can map them as huge pages.
            m = mmap.mmap(-1, r.size + HUGE_PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot)
            skip = -_address_of(m) % HUGE_PAGE
        try:
            m.madvise(mmap.MADV_HUGEPAGE, skip, r.size)
        except (OSError, AttributeError, ValueError):
            pass  # THP off or unsupported: 4 KiB pages, just slower under nested paging
        self._mmaps.append(m)
        view = memoryview(m)[skip:skip + r.size]
        self._maps.append(view)
        self._addresses.append(_address_of(view))

    @classmethod
    def create(cls, total: int, backend: str = "auto") -> "GuestMemory":
        return cls(ram_ranges(total), backend=backend)

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
        return self._maps[i][off:off + length].tobytes()

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
        return self._maps[i][off:off + length]

    def pages(self) -> int:
        return self.size // PAGE_SIZE

    def close(self) -> None:
        self._arrays = None
        for view in self._maps:
            try:
                view.release()
            except BufferError:
                pass
        self._maps = []
        for m in self._mmaps:
            try:
                m.close()
            except BufferError:
                pass  # a view is still alive somewhere; the mapping goes with it
        self._mmaps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "GuestMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
