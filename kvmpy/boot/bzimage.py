"""Linux x86 boot protocol (Documentation/arch/x86/boot.rst) for bzImage kernels.

We skip the real-mode setup code and enter the protected-mode kernel directly: at its 64-bit
entry (load address + 0x200) when the header advertises XLF_KERNEL_64, else at its 32-bit entry
(the load address). Either way we fill the zero page (struct boot_params) the setup code would.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kvmpy.boot.e820 import E820_MAX_ZERO_PAGE, build_e820
from kvmpy.boot.entry import BootEntry, long_mode_entry, protected_mode_entry
from kvmpy.boot.image import ImageBytes, load_initrd
from kvmpy.boot.layout import (CMDLINE_ADDR, HIMEM_START, PAGE_SIZE, ZERO_PAGE_ADDR, BootRegion,
                               check_fits, low_ram_end, write_cmdline)
from kvmpy.memslots import GuestMemory

log = logging.getLogger(__name__)

HDRS_MAGIC = b"HdrS"
BOOT_FLAG = 0xAA55
MIN_PROTOCOL = 0x0206
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_MAX_END = 0x290      # boot_params.hdr cannot extend past edd_mbr_sig_buffer
ENTRY_64_OFFSET = 0x200

LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
LOADER_TYPE_UNDEFINED = 0xFF
HEAP_END_PTR = 0xFE00             # what kvmtool/QEMU give: the setup heap ends below 64 KiB

# boot_params offsets (arch/x86/include/uapi/asm/bootparam.h, Documentation/arch/x86/zero-page.rst)
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_ALT_MEM_K = 0x1E0
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
BOOT_PARAMS_SIZE = 0x1000
# setup_header offsets (same in the file and in boot_params)
HDR_SETUP_SECTS = 0x1F1
HDR_SYSSIZE = 0x1F4
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP_LEN = 0x201
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_KERNEL_ALIGNMENT = 0x230
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_PREF_ADDRESS = 0x258
HDR_INIT_SIZE = 0x260


def is_bzimage(data: bytes) -> bool:
    return data[HDR_MAGIC:HDR_MAGIC + 4] == HDRS_MAGIC


@dataclass(frozen=True)
class SetupHeader:
    """The fields of the setup header a loader acts on, validated."""
    version: int
    setup_sects: int
    header_end: int              # offset just past the header (0x202 + byte at 0x201)
    loadflags: int
    xloadflags: int
    relocatable: bool
    kernel_alignment: int
    pref_address: int
    init_size: int
    initrd_addr_max: int
    cmdline_size: int
    syssize: int

    @property
    def setup_size(self) -> int:
        return (self.setup_sects + 1) * 512

    @property
    def has_64bit_entry(self) -> bool:
        return bool(self.xloadflags & XLF_KERNEL_64)


def parse_setup_header(image: ImageBytes) -> SetupHeader:
    """Validate the bzImage header (magic, protocol >= 2.06, LOADED_HIGH, alignment)."""
    if len(image) < HDR_CMDLINE_SIZE + 4 or not is_bzimage(image.data):
        raise image.error("not a bzImage: no 'HdrS' setup header at offset 0x202")
    version = image.u16(HDR_VERSION)
    if version < MIN_PROTOCOL:
        raise image.error(f"boot protocol {version >> 8}.{version & 0xFF:02d} is too old "
                          f"(kvmpy needs 2.06 or newer)")
    if image.u16(HDR_BOOT_FLAG) != BOOT_FLAG:
        raise image.error(f"boot_flag is {image.u16(HDR_BOOT_FLAG):#06x}, not 0xaa55")
    header_end = min(HDR_MAGIC + image.u8(HDR_JUMP_LEN), SETUP_HEADER_MAX_END)
    if header_end < HDR_CMDLINE_SIZE + 4:
        raise image.error(f"setup header ends at {header_end:#x}, too short for protocol 2.06")

    def field(fmt: str, offset: int) -> int:
        """A header field, or 0 when this kernel's header is too short to have it."""
        size = {"B": 1, "H": 2, "I": 4, "Q": 8}[fmt]
        return image.unpack("<" + fmt, offset)[0] if offset + size <= header_end else 0

    loadflags = field("B", HDR_LOADFLAGS)
    if not loadflags & LOADED_HIGH:
        raise image.error("kernel is not LOADED_HIGH (a zImage); only bzImage is supported")
    setup_sects = field("B", HDR_SETUP_SECTS) or 4
    relocatable = bool(field("B", HDR_RELOCATABLE))
    alignment = field("I", HDR_KERNEL_ALIGNMENT)
    if relocatable and (alignment == 0 or alignment & (alignment - 1)):
        raise image.error(f"kernel_alignment {alignment:#x} is not a power of two")
    pref_address = field("Q", HDR_PREF_ADDRESS) if version >= 0x020A else 0
    init_size = field("I", HDR_INIT_SIZE) if version >= 0x020A else 0
    hdr = SetupHeader(version=version, setup_sects=setup_sects, header_end=header_end,
                      loadflags=loadflags, xloadflags=field("H", HDR_XLOADFLAGS) if version >= 0x020C else 0,
                      relocatable=relocatable, kernel_alignment=alignment, pref_address=pref_address,
                      init_size=init_size, initrd_addr_max=field("I", HDR_INITRD_ADDR_MAX),
                      cmdline_size=field("I", HDR_CMDLINE_SIZE), syssize=field("I", HDR_SYSSIZE))
    payload = len(image) - hdr.setup_size
    if payload <= 0:
        raise image.error(f"file is truncated: {len(image)} bytes end inside the "
                          f"{hdr.setup_size}-byte real-mode setup")
    if hdr.syssize * 16 > payload + 15:     # syssize counts 16-byte paragraphs, rounded up
        raise image.error(f"file is truncated: the header promises {hdr.syssize * 16} bytes of "
                          f"protected-mode kernel, the file has {payload}")
    if hdr.has_64bit_entry and payload <= ENTRY_64_OFFSET:   # the vCPU would start past the kernel
        raise image.error(f"the 64-bit entry at +{ENTRY_64_OFFSET:#x} lies past the end of the "
                          f"{payload}-byte protected-mode kernel")
    return hdr


def choose_load_address(hdr: SetupHeader, payload_size: int, ram_end: int) -> tuple[int, int]:
    """(load address, end of the memory the kernel needs while decompressing and running).

    A relocatable kernel goes at pref_address when it fits (it then need not move itself);
    otherwise at 1 MiB, from where it moves to pref_address/its alignment on its own, so that
    area has to be RAM too.
    """
    need = max(hdr.init_size, payload_size)
    run_at = hdr.pref_address or HIMEM_START
    load = HIMEM_START
    if (hdr.relocatable and hdr.pref_address >= HIMEM_START and hdr.pref_address % hdr.kernel_alignment == 0
            and hdr.pref_address + need <= ram_end):
        load = hdr.pref_address
    return load, max(load, run_at) + need


def _write_zero_page(mem: GuestMemory, image: ImageBytes, hdr: SetupHeader, load: int,
                     cmdline_len: int, initrd: tuple[int, int]) -> None:
    zp = ZERO_PAGE_ADDR
    mem.fill(zp, BOOT_PARAMS_SIZE, 0)
    mem.write(zp + SETUP_HEADER_START, image.slice(SETUP_HEADER_START, hdr.header_end - SETUP_HEADER_START,
                                                   "setup header"))
    mem.write(zp + HDR_TYPE_OF_LOADER, bytes((LOADER_TYPE_UNDEFINED,)))
    mem.write(zp + HDR_LOADFLAGS, bytes((hdr.loadflags | CAN_USE_HEAP,)))
    mem.write_u16(zp + HDR_HEAP_END_PTR, HEAP_END_PTR)
    mem.write_u32(zp + HDR_CODE32_START, load)
    mem.write_u32(zp + HDR_CMD_LINE_PTR, CMDLINE_ADDR)
    mem.write_u32(zp + BP_EXT_CMD_LINE_PTR, CMDLINE_ADDR >> 32)
    initrd_addr, initrd_size = initrd
    mem.write_u32(zp + HDR_RAMDISK_IMAGE, initrd_addr & 0xFFFFFFFF)
    mem.write_u32(zp + HDR_RAMDISK_SIZE, initrd_size & 0xFFFFFFFF)
    mem.write_u32(zp + BP_EXT_RAMDISK_IMAGE, initrd_addr >> 32)
    mem.write_u32(zp + BP_EXT_RAMDISK_SIZE, initrd_size >> 32)
    e820 = build_e820(mem.ranges)
    if len(e820) > E820_MAX_ZERO_PAGE:
        raise image.error(f"{len(e820)} e820 entries do not fit the zero page")
    mem.write(zp + BP_E820_ENTRIES, bytes((len(e820),)))
    mem.write(zp + BP_E820_TABLE, b"".join(e.pack() for e in e820))
    ram_above_1m = sum(e.size for e in e820 if e.type == 1 and e.addr >= HIMEM_START)
    mem.write_u32(zp + BP_ALT_MEM_K, min(ram_above_1m // 1024, 0xFFFFFFFF))
    log.debug("zero page at %#x: cmdline %d bytes, %d e820 entries", zp, cmdline_len, len(e820))


def load_bzimage(mem: GuestMemory, image: ImageBytes, cmdline: str, initrd_path: str | None) -> BootEntry:
    """Load a bzImage, its command line and initrd; return how the boot vCPU starts."""
    hdr = parse_setup_header(image)
    payload = image.data[hdr.setup_size:]
    ram_end = low_ram_end(mem)
    load, kernel_end = choose_load_address(hdr, len(payload), ram_end)
    check_fits(mem, image.path, f"the kernel (init_size {hdr.init_size:#x})", load, kernel_end - load)
    mem.write(load, payload)
    cmdline_len = write_cmdline(mem, image.path, cmdline, limit=hdr.cmdline_size)
    regions = [BootRegion("kernel", load, len(payload)), BootRegion("zero page", ZERO_PAGE_ADDR, PAGE_SIZE),
               BootRegion("cmdline", CMDLINE_ADDR, cmdline_len + 1)]
    initrd = (0, 0)
    if initrd_path is not None:
        ceiling = min(hdr.initrd_addr_max + 1, ram_end, 1 << 32)
        loaded = load_initrd(mem, initrd_path, kernel_end, ceiling)
        initrd = (loaded.gpa, loaded.size)
        regions.append(loaded.region())
    _write_zero_page(mem, image, hdr, load, cmdline_len, initrd)
    log.info("bzImage %s: protocol %#x, loaded at %#x (%d bytes), %s entry", image.path, hdr.version,
             load, len(payload), "64-bit" if hdr.has_64bit_entry else "32-bit")
    if hdr.has_64bit_entry:
        return long_mode_entry(mem, "bzimage", load + ENTRY_64_OFFSET, ZERO_PAGE_ADDR, regions)
    return protected_mode_entry(mem, "bzimage", load, regions, rsi=ZERO_PAGE_ADDR)
