"""Multiboot (version 1) kernels: ELF images or a.out-kludge images with load addresses in the
header. Entry is flat 32-bit protected mode, paging off, EAX=0x2BADB002, EBX=multiboot_info.
"""
from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from kvmpy.boot.e820 import build_e820, lower_memory_kib, upper_memory_kib
from kvmpy.boot.elf import ElfImage, is_elf, load_segments, parse_elf
from kvmpy.boot.entry import BootEntry, protected_mode_entry
from kvmpy.boot.image import ImageBytes, load_initrd
from kvmpy.boot.layout import (CMDLINE_ADDR, CMDLINE_MAX, EBDA_START, HIMEM_START, MEMMAP_ADDR, PAGE_SIZE,
                               PVH_INFO_ADDR, BootRegion, align_up, check_fits, low_ram_end, write_cmdline)
from kvmpy.memslots import GuestMemory

log = logging.getLogger(__name__)

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_BYTES = 8192
FLAG_PAGE_ALIGN = 1 << 0        # modules page-aligned: we always do
FLAG_MEMORY_INFO = 1 << 1       # mem_* and mmap_* must be provided: we always do
FLAG_VIDEO_MODE = 1 << 2        # video info wanted: we have no framebuffer, so text mode only
FLAG_AOUT_KLUDGE = 1 << 16
KNOWN_REQUIRED = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE

INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9
INFO_SIZE = 0x74                # up to and including the framebuffer fields (all left zero)
INFO_OFF_MEM_LOWER = 4
INFO_OFF_MEM_UPPER = 8
INFO_OFF_CMDLINE = 16
INFO_OFF_MODS_COUNT = 20
INFO_OFF_MODS_ADDR = 24
INFO_OFF_MMAP_LENGTH = 44
INFO_OFF_MMAP_ADDR = 48
INFO_OFF_LOADER_NAME = 64
LOADER_NAME = b"kvmpy\0"
MODULE_ENTRY_FMT = "<IIII"      # mod_start, mod_end (exclusive), string, reserved
MMAP_ENTRY_FMT = "<IQQI"        # size (20, not counting itself), base_addr, length, type
MODULES_ADDR = PVH_INFO_ADDR + 0x100   # module list and module strings, after multiboot_info
# Below 1 MiB a multiboot kernel may load here (16-bit test code often lives at 0x8000): under it
# the real-mode IVT/BDA and the loader's GDT/IDT, above it the EBDA (MP table), the VGA hole and
# the BIOS area (ACPI tables). The multiboot tables then move above the kernel.
LOW_WINDOW = (0x1000, EBDA_START & ~(PAGE_SIZE - 1))
TABLES_BYTES = 0x3000           # info, module list + strings, memory map, loader name (cmdline apart)


@dataclass(frozen=True)
class MultibootHeader:
    offset: int                 # where in the file the header starts
    flags: int
    header_addr: int = 0
    load_addr: int = 0
    load_end_addr: int = 0
    bss_end_addr: int = 0
    entry_addr: int = 0


def find_header(data: bytes) -> int | None:
    """Offset of a multiboot header (magic + valid checksum, 4-byte aligned, in the first 8 KiB)."""
    limit = min(len(data), SEARCH_BYTES) - 12
    for off in range(0, limit + 1, 4):
        if int.from_bytes(data[off:off + 4], "little") != HEADER_MAGIC:
            continue
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off
    return None


def parse_header(image: ImageBytes, offset: int) -> MultibootHeader:
    flags = image.u32(offset + 4, "multiboot header")
    unknown = flags & 0xFFFF & ~KNOWN_REQUIRED
    if unknown:
        raise image.error(f"multiboot header requires features {unknown:#x} kvmpy does not provide")
    if flags & FLAG_VIDEO_MODE:
        log.warning("%s asks for video mode information; kvmpy has no framebuffer, booting in text mode",
                    image.path)
    if not flags & FLAG_AOUT_KLUDGE:
        return MultibootHeader(offset, flags)
    fields = image.unpack("<IIIII", offset + 12, "multiboot a.out address fields")
    return MultibootHeader(offset, flags, *fields)


def load_aout_kludge(mem: GuestMemory, image: ImageBytes, hdr: MultibootHeader) -> tuple[list[BootRegion], int]:
    """Load the image by the header's addresses: file offset of load_addr is
    header offset - (header_addr - load_addr)."""
    if not hdr.load_addr <= hdr.header_addr:
        raise image.error(f"load_addr {hdr.load_addr:#x} is above header_addr {hdr.header_addr:#x}")
    file_start = hdr.offset - (hdr.header_addr - hdr.load_addr)
    if file_start < 0:
        raise image.error("header_addr - load_addr points before the start of the file")
    load_end = hdr.load_end_addr or hdr.load_addr + (len(image) - file_start)
    if load_end < hdr.load_addr:
        raise image.error(f"load_end_addr {load_end:#x} is below load_addr {hdr.load_addr:#x}")
    bss_end = hdr.bss_end_addr or load_end
    if bss_end < load_end:
        raise image.error(f"bss_end_addr {bss_end:#x} is below load_end_addr {load_end:#x}")
    if hdr.load_addr < HIMEM_START and not LOW_WINDOW[0] <= hdr.load_addr <= bss_end <= LOW_WINDOW[1]:
        raise image.error(f"load_addr {hdr.load_addr:#x}..{bss_end:#x} overlaps the loader's tables below "
                          f"1 MiB (outside [{LOW_WINDOW[0]:#x}, {LOW_WINDOW[1]:#x}))")
    if not hdr.load_addr <= hdr.entry_addr < load_end:
        raise image.error(f"entry_addr {hdr.entry_addr:#x} is outside the loaded text/data")
    check_fits(mem, image.path, "the kernel", hdr.load_addr, bss_end - hdr.load_addr)
    text = image.slice(file_start, load_end - hdr.load_addr, "a.out text and data")
    mem.write(hdr.load_addr, text)
    mem.fill(load_end, bss_end - load_end, 0)
    return [BootRegion("kernel", hdr.load_addr, bss_end - hdr.load_addr)], bss_end


def elf_entry_physical(elf: ElfImage) -> int:
    """e_entry as a physical address: like GRUB, translate it through the segment whose virtual
    range holds it (kernels linked high but loaded low), else take it as physical."""
    for seg in elf.loads:
        if seg.vaddr <= elf.entry < seg.vaddr + seg.memsz:
            return seg.paddr + (elf.entry - seg.vaddr)
    return elf.entry


@dataclass(frozen=True)
class TableSpots:
    """Where the multiboot tables go: the fixed low map, or (a kernel loaded below 1 MiB) a block above it."""
    info: int
    modules: int
    mmap: int
    cmdline: int

    @classmethod
    def for_kernel(cls, regions: list[BootRegion], kernel_end: int) -> "TableSpots":
        if all(r.gpa >= HIMEM_START for r in regions):
            return cls(PVH_INFO_ADDR, MODULES_ADDR, MEMMAP_ADDR, CMDLINE_ADDR)
        base = align_up(max(kernel_end, HIMEM_START), PAGE_SIZE)
        return cls(base, base + 0x100, base + 0x1000, base + TABLES_BYTES)

    @property
    def end(self) -> int:
        return self.cmdline + CMDLINE_MAX if self.info != PVH_INFO_ADDR else 0


def load_multiboot(mem: GuestMemory, image: ImageBytes, header_offset: int, cmdline: str,
                   modules: list[tuple[str, str]] | None = None) -> BootEntry:
    """Load a multiboot v1 kernel, its modules [(path, string)] and its multiboot_info; return the
    32-bit entry state."""
    hdr = parse_header(image, header_offset)
    if hdr.flags & FLAG_AOUT_KLUDGE:
        regions, kernel_end = load_aout_kludge(mem, image, hdr)
        entry = hdr.entry_addr
    elif is_elf(image.data):
        elf = parse_elf(image)
        regions, kernel_end = load_segments(mem, image, elf, low_window=LOW_WINDOW)
        entry = elf_entry_physical(elf)
        if entry > 0xFFFFFFFF or not any(r.gpa <= entry < r.end for r in regions):
            raise image.error(f"ELF entry point {entry:#x} is outside every loaded segment")
    else:
        raise image.error("multiboot header without the a.out kludge flag, and the file is not ELF")

    spots = TableSpots.for_kernel(regions, kernel_end)
    if spots.end:
        check_fits(mem, image.path, "the multiboot tables above a kernel loaded below 1 MiB", spots.info,
                   spots.end - spots.info)
    cmdline_len = write_cmdline(mem, image.path, cmdline, addr=spots.cmdline)
    regions.append(BootRegion("cmdline", spots.cmdline, cmdline_len + 1))
    info_flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME
    info = bytearray(INFO_SIZE)
    if modules:
        regions += _load_modules(mem, image, modules, spots.modules, max(kernel_end, spots.end))
        info_flags |= INFO_MODS
        struct.pack_into("<II", info, INFO_OFF_MODS_COUNT, len(modules), spots.modules)

    e820 = build_e820(mem.ranges)
    mmap = b"".join(struct.pack(MMAP_ENTRY_FMT, 20, e.addr, e.size, e.type) for e in e820)
    mem.write(spots.mmap, mmap)
    regions.append(BootRegion("mmap", spots.mmap, len(mmap)))
    loader_name_addr = spots.mmap + len(mmap)
    mem.write(loader_name_addr, LOADER_NAME)

    struct.pack_into("<I", info, 0, info_flags)
    struct.pack_into("<II", info, INFO_OFF_MEM_LOWER, lower_memory_kib(e820), upper_memory_kib(e820))
    struct.pack_into("<I", info, INFO_OFF_CMDLINE, spots.cmdline)
    struct.pack_into("<II", info, INFO_OFF_MMAP_LENGTH, len(mmap), spots.mmap)
    struct.pack_into("<I", info, INFO_OFF_LOADER_NAME, loader_name_addr)
    mem.write(spots.info, bytes(info))
    regions.append(BootRegion("multiboot_info", spots.info, INFO_SIZE))
    log.info("multiboot %s: entry %#x, kernel ends at %#x", os.path.basename(image.path), entry, kernel_end)
    return protected_mode_entry(mem, "multiboot", entry, regions, rax=BOOTLOADER_MAGIC, rbx=spots.info)


def _load_modules(mem: GuestMemory, image: ImageBytes, modules: list[tuple[str, str]], list_addr: int,
                  floor: int) -> list[BootRegion]:
    """Each module page-aligned, in order, the last highest below 4 GiB; the module list at
    `list_addr` with each module's string after it."""
    ceiling = min(low_ram_end(mem), 1 << 32)
    loaded = []
    for path, _ in reversed(modules):
        module = load_initrd(mem, path, floor, ceiling)
        loaded.append(module)
        ceiling = module.gpa
    loaded.reverse()
    strings = [text.encode("utf-8", "replace")[:PAGE_SIZE // 4] + b"\0" for _, text in modules]
    string_addr = list_addr + struct.calcsize(MODULE_ENTRY_FMT) * len(modules)
    if string_addr + sum(map(len, strings)) > list_addr + 0xF00:
        raise image.error(f"{len(modules)} modules and their names do not fit the module list")
    regions = []
    for i, (module, name) in enumerate(zip(loaded, strings)):
        mem.write(list_addr + 16 * i, struct.pack(MODULE_ENTRY_FMT, module.gpa, module.gpa + module.size, string_addr, 0))
        mem.write(string_addr, name)
        string_addr += len(name)
        regions.append(BootRegion("initrd" if i == 0 else f"module{i}", module.gpa, module.size))
    regions.append(BootRegion("modules", list_addr, string_addr - list_addr))
    return regions
