"""Where the loaders put their tables in low guest memory, and helpers shared by all formats.

One fixed map below 1 MiB (like Firecracker/cloud-hypervisor), so every format and the composer
agree on it and nothing a kernel loads at >= 1 MiB can collide with it.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmpy.errors import BootError
from kvmpy.memslots import GuestMemory

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096

GDT_ADDR = 0x500            # GDT: null, null, code 0x10, data 0x18, 16-byte TSS 0x20
IDT_ADDR = 0x540            # an empty IDT (one null gate): any early interrupt triple-faults visibly
PVH_INFO_ADDR = 0x6000      # hvm_start_info or multiboot_info
PVH_MODLIST_ADDR = 0x6040   # hvm_modlist_entry[] / multiboot module list
ZERO_PAGE_ADDR = 0x7000     # struct boot_params (bzImage) or the memory map table (PVH, multiboot)
MEMMAP_ADDR = 0x7000
STACK_TOP = 0x8FF0          # initial stack pointer (grows down into 0x8000..0x8fff)
PML4_ADDR = 0x9000          # identity page tables: PML4, one PDPT, four page directories
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000            # 0xB000..0xEFFF
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000       # 64 KiB including the terminating NUL
EBDA_START = 0x9FC00        # extended BIOS data area: MP table lives here
BIOS_AREA_START = 0xF0000   # BIOS ROM area, the second place OSes scan for the MP floating pointer
HIMEM_START = 0x100000      # kernels and modules go at or above 1 MiB
LOW_AREA_END = HIMEM_START


@dataclass(frozen=True)
class BootRegion:
    """A named range of guest memory a loader wrote (for the composer, logs and tests)."""
    name: str
    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def low_ram_end(mem: GuestMemory) -> int:
    """End of the RAM range that starts at GPA 0 (RAM below the 32-bit device hole)."""
    for r in mem.ranges:
        if r.gpa == 0:
            return r.end
    raise BootError("laying out boot memory", detail="guest RAM does not start at address 0")


def check_fits(mem: GuestMemory, path: str, what: str, gpa: int, size: int) -> None:
    """Raise BootError unless [gpa, gpa+size) is guest RAM."""
    if size < 0 or gpa < 0 or not mem.contains(gpa, max(size, 1)):
        raise BootError(f"loading {path}",
                        detail=f"{what} needs [{gpa:#x}, {gpa + size:#x}) but that is not inside "
                               f"guest RAM ({mem.size // MiB} MiB); give the guest more memory")


def write_cmdline(mem: GuestMemory, path: str, cmdline: str, limit: int = CMDLINE_MAX - 1,
                  addr: int = CMDLINE_ADDR) -> int:
    """Write the NUL-terminated command line at `addr` (CMDLINE_ADDR unless a multiboot kernel
    took that spot); returns its length without NUL."""
    try:
        data = cmdline.encode("ascii")
    except UnicodeEncodeError:
        raise BootError(f"loading {path}", detail="the kernel command line must be ASCII") from None
    if b"\0" in data:
        raise BootError(f"loading {path}", detail="the kernel command line contains a NUL byte")
    limit = min(limit, CMDLINE_MAX - 1)
    if len(data) > limit:
        raise BootError(f"loading {path}",
                        detail=f"command line is {len(data)} bytes, the kernel accepts at most {limit}")
    check_fits(mem, path, "the command line", addr, len(data) + 1)
    mem.write(addr, data + b"\0")
    return len(data)
