"""Which blocks of a disk image the guest wrote since block migration last copied them: a byte
per block of BLOCK_SIZE bytes, shared by both virtio-blk data paths.

Why a byte per block and not a bit: both writers mark without read-modify-write. The Python path
(VirtioBlk._rw/_discard, holding the GIL) and the C path (kvmpy_blk_run, GIL released, on the
same I/O thread but concurrent with the migration thread) store 1 into a block's byte *after*
the write reached the image; `take()` reads and zeroes the map with kvmpy_dirty_take, an atomic
exchange per 8-byte word, so a mark set meanwhile lands either in this take or stays for the
next. The copier zeroes a block's mark *before* it reads the block from the image, so every
write either precedes the read or marks the block again: the same order the dirty-page
tracker (kvmpy.memslots.dirty) keeps for guest RAM. The map costs 1/65536 of the image.
"""
from __future__ import annotations

from typing import Any

BLOCK_SIZE = 1 << 16            # 64 KiB: the copy granularity of block migration
BLOCK_SHIFT = BLOCK_SIZE.bit_length() - 1


def blocks_of(image_bytes: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks covering an image of `image_bytes` (the last one may be partial)."""
    return -(-image_bytes // block_size)


class DirtyBlocks:
    """The dirty-block map of one image of `image_bytes`. `mark()` from the Python data path,
    `c_pointer` for the C path's struct kvmpy_blk, `take()` for the copier."""

    def __init__(self, image_bytes: int, block_size: int = BLOCK_SIZE):
        if block_size < 512 or block_size & (block_size - 1):
            raise ValueError(f"block size {block_size} is not a power of two >= 512")
        self.image_bytes, self.block_size = image_bytes, block_size
        self.shift = block_size.bit_length() - 1
        self.blocks = blocks_of(image_bytes, block_size)
        self.map = bytearray(self.blocks)
        self._c_map: Any = None
        self._c_take: Any = None
        try:
            from kvmpy.ioctl._kvm import ffi, lib
            if hasattr(lib, "kvmpy_dirty_take"):
                self._ffi, self._c_take = ffi, lib.kvmpy_dirty_take
                self._c_map = ffi.from_buffer("uint8_t[]", self.map, require_writable=True)
        except ImportError:         # an unbuilt checkout: the Python path alone writes
            pass

    @property
    def c_pointer(self) -> Any:
        """A uint8_t * to the map for kvmpy_blk_run (NULL-able cdata), or None without C."""
        return self._c_map

    def mark(self, offset: int, length: int) -> None:
        """The image's bytes [offset, offset+length) were (or may have been) written."""
        if length <= 0:
            return
        first = offset >> self.shift
        last = min((offset + length - 1) >> self.shift, self.blocks - 1)
        if first <= last:
            self.map[first:last + 1] = b"\1" * (last + 1 - first)

    def mark_all(self) -> None:
        self.map[:] = b"\1" * self.blocks

    def count(self) -> int:
        """Dirty blocks now (a snapshot: marks keep coming while the guest runs)."""
        return self.blocks - self.map.count(0)

    def take(self) -> "Any":
        """The dirty blocks (numpy bool per block), zeroed in the map in the same step: copy
        them from the image after this call, never before."""
        import numpy as np
        out = np.zeros(self.blocks, dtype=np.uint8)
        if self._c_take is not None and self.blocks:
            self._c_take(self._c_map, self._ffi.from_buffer("uint8_t[]", out), self.blocks)
            return out.astype(bool)
        # Without C nothing marks concurrently (the Python path holds the GIL): zero exactly the
        # bytes read as set, so a mark between the read and the clear is never erased.
        view = np.frombuffer(self.map, dtype=np.uint8)
        out[:] = view
        view[out != 0] = 0
        return out.astype(bool)
