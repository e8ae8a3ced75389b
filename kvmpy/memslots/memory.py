"""Guest RAM, mapped once per RAM range, exposed as numpy uint8 arrays.

Backed by a memfd, so the same pages can be handed to vhost, a second process or a migration
target by file descriptor, whenever the kernel backs shmem with transparent huge pages; else by
anonymous memory (fd -1) with MADV_HUGEPAGE, because 4 KiB pages under nested paging are slow.
`backend="memfd"` forces sharing. Every GPA access is bounds-checked: addresses come
from a possibly hostile guest.

Writes kvmpy itself makes into guest RAM are invisible to KVM's dirty log, so GuestMemory keeps
the one userspace dirty map live migration merges with it: a byte per page per RAM range
(`dirty_maps`, 1/4096 of RAM), set *after* the write lands. Who marks what:
  - write/fill/write_u16/u32/u64 mark themselves, only while `tracking` (one flag check otherwise);
  - views from buffer()/view()/arrays are not tracked here: the virtqueue marks what devices write
    through them when it returns a chain (Virtqueue.push: the chain's writable buffers and the used
    ring; pop: the used ring's avail_event), which covers virtio-blk, -rng, -console and -net on the
    Python path;
  - the C data path (vqfast.c) sets the same bytes for the chains it completes, always (a byte
    store per page next to a preadv costs nothing), and fastpath.blk_process marks the used ring.
Marks are idempotent byte stores (never read-modify-write), so C and Python never lose each
other's marks; the migration side takes the bytes of what it is about to send with an atomic exchange
(memslots.dirty.take_marks).
Not tracked: API users writing through numpy views, and vhost-net's kernel writes. The core works on the mmaps directly; numpy is imported on the
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
        self._init_dirty()

    def _init_dirty(self) -> None:
        self.tracking = False
        self.dirty_maps = [bytearray(r.size // PAGE_SIZE) for r in self.ranges]

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

    @classmethod
    def map_file(cls, total: int, fd: int, offsets: dict[int, int]) -> "GuestMemory":
        """Guest RAM mapped copy-on-write (MAP_PRIVATE) from a snapshot file: range at gpa G
        reads from file offset offsets[G] (page-aligned; holes read as zeros). Nothing is read
        up front, so a restore costs the same for 64 MiB as for 64 GiB; pages fault in as the
        guest touches them, and its writes never reach the file. Not shareable by fd (backend
        "file"): vhost or a second process needs a memfd backend instead."""
        self = cls.__new__(cls)
        self.backend, self.fd, self.size = "file", -1, total
        self.ranges = sorted(ram_ranges(total), key=lambda r: r.gpa)
        self._mmaps, self._maps, self._arrays, self._addresses = [], [], None, []
        prot = mmap.PROT_READ | mmap.PROT_WRITE
        try:
            file_size = os.fstat(fd).st_size
            for r in self.ranges:
                if offsets.get(r.gpa, 0) + r.size > file_size:   # a mapping past EOF is SIGBUS later
                    raise KvmpyError("mapping guest RAM from the snapshot",
                                     detail=f"the file ends before the range at {r.gpa:#x} (truncated?)")
                if r.gpa not in offsets or offsets[r.gpa] % PAGE_SIZE:
                    raise KvmpyError("mapping guest RAM from the snapshot",
                                     detail=f"no page-aligned data for the range at {r.gpa:#x}")
                m = mmap.mmap(fd, r.size, mmap.MAP_PRIVATE, prot, offset=offsets[r.gpa])
                self._mmaps.append(m)
                view = memoryview(m)
                self._maps.append(view)
                self._addresses.append(_address_of(view))
        except (OSError, ValueError) as e:
            self.close()
            raise KvmpyError("mapping guest RAM from the snapshot", errno=getattr(e, "errno", None),
                             detail=str(e)) from None
        except BaseException:
            self.close()
            raise
        self._starts = [r.gpa for r in self.ranges]
        self._init_dirty()
        return self

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

    # -- the userspace dirty map (see the module docstring) -------------------------------------
    def start_tracking(self) -> None:
        """Clear the dirty map and mark kvmpy's own writes from now on (a migration starts)."""
        for m in self.dirty_maps:
            m[:] = bytes(len(m))
        self.tracking = True

    def stop_tracking(self) -> None:
        self.tracking = False

    def mark_dirty(self, gpa: int, length: int) -> None:
        """Mark the pages of [gpa, gpa+length) as written by kvmpy (call after the write). Quietly
        ignores what is not RAM: the caller's own access already failed or was checked."""
        if length <= 0:
            return
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            return
        r = self.ranges[i]
        first = (gpa - r.gpa) // PAGE_SIZE
        last = min(r.size, gpa - r.gpa + length + PAGE_SIZE - 1) // PAGE_SIZE
        if first < last:
            self.dirty_maps[i][first:last] = b"\1" * (last - first)

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
        if self.tracking:
            self.mark_dirty(gpa, len(buf))

    def fill(self, gpa: int, length: int, value: int = 0) -> None:
        i, off = self._locate(gpa, length)
        self._maps[i][off:off + length] = bytes((value,)) * length
        if self.tracking:
            self.mark_dirty(gpa, length)

    def read_u16(self, gpa: int) -> int:
        i, off = self._locate(gpa, 2)
        return struct.unpack_from("<H", self._maps[i], off)[0]

    def read_u32(self, gpa: int) -> int:
        i, off = self._locate(gpa, 4)
        return struct.unpack_from("<I", self._maps[i], off)[0]

    def read_u64(self, gpa: int) -> int:
        i, off = self._locate(gpa, 8)
        return struct.unpack_from("<Q", self._maps[i], off)[0]

    # Stores through a one-item cast view, never struct.pack_into: pack_into zeroes its target
    # before writing the value, and a vCPU or a C data path reading the same word at that moment
    # (a ring index) sees 0. A memoryview item store is one memcpy of the item's size: one
    # instruction, so readers see the old value or the new one. (Native order: x86 only.)
    def write_u16(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 2)
        self._maps[i][off:off + 2].cast("H")[0] = value
        if self.tracking:
            self.mark_dirty(gpa, 2)

    def write_u32(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 4)
        self._maps[i][off:off + 4].cast("I")[0] = value
        if self.tracking:
            self.mark_dirty(gpa, 4)

    def write_u64(self, gpa: int, value: int) -> None:
        i, off = self._locate(gpa, 8)
        self._maps[i][off:off + 8].cast("Q")[0] = value
        if self.tracking:
            self.mark_dirty(gpa, 8)

    def buffer(self, gpa: int, length: int) -> memoryview:
        """A writable memoryview for preadv/pwritev/recv_into straight into guest RAM. Writes
        through it are not marked dirty here: call mark_dirty afterwards (the virtqueue does)."""
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
