"""Guest RAM: memfd-backed numpy views, the RAM layout around the device hole, dirty bitmaps."""
from kvmpy.memslots.dirty import bitmap_to_pages, pages_to_bitmap
from kvmpy.memslots.layout import HOLE_END, HOLE_START, PAGE_SIZE, RamRange, parse_size, ram_ranges
from kvmpy.memslots.memory import GuestMemory

__all__ = ["GuestMemory", "RamRange", "ram_ranges", "parse_size", "bitmap_to_pages",
           "pages_to_bitmap", "PAGE_SIZE", "HOLE_START", "HOLE_END"]
