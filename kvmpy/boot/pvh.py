"""PVH direct boot of an ELF vmlinux (the Xen PVH ABI that Linux, FreeBSD and others implement).

The kernel names its 32-bit entry in an ELF note (XEN_ELFNOTE_PHYS32_ENTRY); we enter there in
flat 32-bit protected mode with paging off and EBX pointing at struct hvm_start_info (version 1,
with a memory map), the command line and the initrd as module 0.
"""
from __future__ import annotations

import logging
import os
import struct

from kvmpy.boot.e820 import build_e820
from kvmpy.boot.elf import ElfImage, notes
from kvmpy.boot.entry import BootEntry, protected_mode_entry
from kvmpy.boot.image import ImageBytes, load_initrd
from kvmpy.boot.layout import (CMDLINE_ADDR, MEMMAP_ADDR, PAGE_SIZE, PVH_INFO_ADDR, PVH_MODLIST_ADDR,
                               BootRegion, low_ram_end, write_cmdline)
from kvmpy.boot.elf import load_segments
from kvmpy.memslots import GuestMemory

log = logging.getLogger(__name__)

XEN_ELFNOTE_PHYS32_ENTRY = 18
XEN_NOTE_NAME = b"Xen"
HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
START_INFO_FMT = "<IIIIQQQQII"      # magic, version, flags, nr_modules, modlist, cmdline, rsdp,
START_INFO_SIZE = struct.calcsize(START_INFO_FMT)   # memmap_paddr, memmap_entries, reserved
MODLIST_ENTRY_FMT = "<QQQQ"         # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY_FMT = "<QQII"          # addr, size, type, reserved
MEMMAP_MAX_ENTRIES = PAGE_SIZE // struct.calcsize(MEMMAP_ENTRY_FMT)


def pvh_entry_point(image: ImageBytes, elf: ElfImage) -> int | None:
    """The PHYS32_ENTRY note's address, or None when the ELF has no PVH note."""
    for note in notes(image, elf):
        if note.name == XEN_NOTE_NAME and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            if len(note.desc) == 4:
                return struct.unpack("<I", note.desc)[0]
            if len(note.desc) == 8:
                entry = struct.unpack("<Q", note.desc)[0]
                if entry > 0xFFFFFFFF:
                    raise image.error(f"PVH entry point {entry:#x} is above 4 GiB")
                return entry
            raise image.error(f"PVH entry note has a {len(note.desc)}-byte value (expected 4 or 8)")
    return None


def load_pvh(mem: GuestMemory, image: ImageBytes, elf: ElfImage, entry: int, cmdline: str,
             initrd_path: str | None) -> BootEntry:
    """Load the ELF's segments and the PVH start_info; return the 32-bit entry state."""
    regions, kernel_end = load_segments(mem, image, elf)
    if not any(r.gpa <= entry < r.end for r in regions):
        raise image.error(f"PVH entry point {entry:#x} is outside every loaded segment")
    cmdline_len = write_cmdline(mem, image.path, cmdline)
    regions.append(BootRegion("cmdline", CMDLINE_ADDR, cmdline_len + 1))

    modules = b""
    if initrd_path is not None:
        initrd = load_initrd(mem, initrd_path, kernel_end, min(low_ram_end(mem), 1 << 32))
        regions.append(initrd.region())
        modules = struct.pack(MODLIST_ENTRY_FMT, initrd.gpa, initrd.size, 0, 0)
        regions.append(BootRegion("modlist", PVH_MODLIST_ADDR, len(modules)))
        mem.write(PVH_MODLIST_ADDR, modules)

    e820 = build_e820(mem.ranges)
    if len(e820) > MEMMAP_MAX_ENTRIES:
        raise image.error(f"{len(e820)} memory map entries do not fit one page")
    memmap = b"".join(struct.pack(MEMMAP_ENTRY_FMT, e.addr, e.size, e.type, 0) for e in e820)
    mem.write(MEMMAP_ADDR, memmap)
    regions.append(BootRegion("memmap", MEMMAP_ADDR, len(memmap)))

    info = struct.pack(START_INFO_FMT, HVM_START_MAGIC, HVM_START_VERSION, 0, 1 if modules else 0,
                       PVH_MODLIST_ADDR if modules else 0, CMDLINE_ADDR, 0, MEMMAP_ADDR, len(e820), 0)
    mem.write(PVH_INFO_ADDR, info)
    regions.append(BootRegion("start_info", PVH_INFO_ADDR, len(info)))
    log.info("PVH %s: %d segments, entry %#x", os.path.basename(image.path), len(elf.loads), entry)
    return protected_mode_entry(mem, "pvh", entry, regions, rbx=PVH_INFO_ADDR)
