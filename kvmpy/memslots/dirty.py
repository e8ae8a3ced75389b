"""Dirty-page bookkeeping: KVM's per-slot bitmaps (little-endian u64 words) as page numbers."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvmpy.memslots.layout import PAGE_SIZE

if TYPE_CHECKING:
    import numpy as np


def bitmap_words(npages: int) -> int:
    """u64 words KVM needs for a slot of `npages` pages (KVM rounds up to 64 bits)."""
    return (npages + 63) // 64


def bitmap_to_pages(bitmap: "np.ndarray", npages: int) -> "np.ndarray":
    """Indices of the set bits of a KVM dirty bitmap (bit i of byte j = page 8*j + i)."""
    import numpy as np
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages]
    return np.flatnonzero(bits)


def pages_to_bitmap(pages: "np.ndarray | list[int]", npages: int) -> "np.ndarray":
    """The inverse of bitmap_to_pages, as u64 words (used for KVM_CLEAR_DIRTY_LOG and tests)."""
    import numpy as np
    bits = np.zeros(bitmap_words(npages) * 64, dtype=np.uint8)
    bits[np.asarray(pages, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def page_of(gpa: int) -> int:
    return gpa // PAGE_SIZE
