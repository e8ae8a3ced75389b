"""Reading kernel and initrd files, and placing the initrd: shared by every boot format.

Kernel files are small enough to read whole; an initrd goes straight from the file into guest
RAM (readinto a view of guest memory) so a large one is never copied twice.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from kvmpy.errors import BootError
from kvmpy.boot.layout import PAGE_SIZE, BootRegion, align_down, check_fits
from kvmpy.memslots import GuestMemory

log = logging.getLogger(__name__)

MAX_KERNEL_BYTES = 1 << 30   # refuse absurd "kernels" before reading them into host memory


class ImageBytes:
    """The bytes of a kernel file with reads that raise BootError (naming the file) on truncation."""

    def __init__(self, path: str, data: bytes):
        self.path = path
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def error(self, reason: str) -> BootError:
        return BootError(f"loading {self.path}", detail=reason)

    def unpack(self, fmt: str, offset: int, what: str = "header") -> tuple:
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > len(self.data):
            raise self.error(f"file is truncated: {what} at offset {offset:#x} (+{size}) "
                             f"lies past its end ({len(self.data)} bytes)")
        return struct.unpack_from(fmt, self.data, offset)

    def u8(self, offset: int, what: str = "header") -> int:
        return self.unpack("<B", offset, what)[0]

    def u16(self, offset: int, what: str = "header") -> int:
        return self.unpack("<H", offset, what)[0]

    def u32(self, offset: int, what: str = "header") -> int:
        return self.unpack("<I", offset, what)[0]

    def slice(self, offset: int, size: int, what: str) -> bytes:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise self.error(f"file is truncated: {what} needs bytes [{offset:#x}, {offset + size:#x}) "
                             f"but the file has {len(self.data)}")
        return self.data[offset:offset + size]


def read_kernel(path: str) -> ImageBytes:
    """Read the whole kernel file, turning every OS error into BootError."""
    try:
        size = os.stat(path).st_size
        if size > MAX_KERNEL_BYTES:
            raise BootError(f"loading {path}", detail=f"{size} bytes is too large for a kernel image")
        with open(path, "rb") as f:
            return ImageBytes(path, f.read())
    except OSError as e:
        raise BootError(f"reading kernel {path}", errno=e.errno) from None


@dataclass(frozen=True)
class LoadedInitrd:
    gpa: int
    size: int

    def region(self) -> BootRegion:
        return BootRegion("initrd", self.gpa, self.size)


def initrd_modules(text: str) -> list[tuple[str, str]]:
    """`--initrd` -> [(path, module string)]. One existing file is taken whole (its name may hold
    commas or spaces); otherwise, as QEMU's multiboot -initrd, "a,b args" is several modules, each
    a path and optional arguments after a space, with ",," for a literal comma. The module string
    is the file's base name and its arguments."""
    if os.path.exists(text):
        return [(text, os.path.basename(text))]
    from kvmpy.options import split_options
    modules = []
    for part in split_options(text):
        path, _, args = part.partition(" ")
        if not path:
            raise BootError(f"reading initrd {text!r}", detail="an empty module name (a stray comma?)")
        modules.append((path, os.path.basename(path) + (f" {args}" if args else "")))
    return modules


def initrd_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise BootError(f"reading initrd {path}", errno=e.errno) from None


def highest_fit(size: int, floor: int, ceiling: int) -> int | None:
    """Highest page-aligned address a where [a, a+size) lies within [floor, ceiling), or None."""
    if size > ceiling:
        return None
    addr = align_down(ceiling - size, PAGE_SIZE)
    return addr if addr >= floor else None


def load_initrd(mem: GuestMemory, path: str, floor: int, ceiling: int) -> LoadedInitrd:
    """Read the initrd into the highest page-aligned spot in [floor, ceiling) of guest RAM.

    `floor` is the end of everything already loaded (the kernel); `ceiling` the lowest of the
    kernel's address limit and the end of RAM below 4 GiB.
    """
    size = initrd_size(path)
    if size == 0:
        raise BootError(f"loading initrd {path}", detail="it is empty (0 bytes)")
    addr = highest_fit(size, floor, ceiling)
    if addr is None:
        raise BootError(f"loading initrd {path}",
                        detail=f"{size} bytes do not fit between the kernel end {floor:#x} and "
                               f"{ceiling:#x}; give the guest more memory")
    check_fits(mem, path, "the initrd", addr, size)
    try:
        with open(path, "rb") as f:
            with mem.buffer(addr, size) as dest:
                done = 0
                while done < size:
                    with dest[done:] as rest:
                        n = f.readinto(rest)
                    if not n:
                        raise BootError(f"reading initrd {path}",
                                        detail=f"file shrank while reading ({done} of {size} bytes)")
                    done += n
    except OSError as e:
        raise BootError(f"reading initrd {path}", errno=e.errno) from None
    log.info("initrd %s: %d bytes at %#x", path, size, addr)
    return LoadedInitrd(addr, size)
