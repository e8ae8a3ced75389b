"""Just enough ELF (32- and 64-bit little-endian x86) to load PT_LOAD segments and read notes.

Shared by the PVH and multiboot loaders. Every header field is checked against the file size and
guest RAM before anything is copied: the file may be truncated or crafted.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmpy.boot.image import ImageBytes
from kvmpy.boot.layout import HIMEM_START, BootRegion, check_fits
from kvmpy.memslots import GuestMemory

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
MAX_PHDRS = 256


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


@dataclass(frozen=True)
class Segment:
    type: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class Note:
    name: bytes
    type: int
    desc: bytes


@dataclass(frozen=True)
class ElfImage:
    bits: int
    entry: int
    segments: tuple[Segment, ...]

    @property
    def loads(self) -> list[Segment]:
        return [s for s in self.segments if s.type == PT_LOAD and s.memsz > 0]


def parse_elf(image: ImageBytes) -> ElfImage:
    """Parse the ELF header and program headers, validating them against the file."""
    if not is_elf(image.data):
        raise image.error("not an ELF file")
    ei_class, ei_data = image.u8(4, "ELF ident"), image.u8(5, "ELF ident")
    if ei_data != ELFDATA2LSB or ei_class not in (ELFCLASS32, ELFCLASS64):
        raise image.error(f"unsupported ELF class {ei_class} / data encoding {ei_data}")
    if ei_class == ELFCLASS64:
        (_, machine, _, entry, phoff, _, _, _, phentsize, phnum, _, _, _) = image.unpack(
            "<HHIQQQIHHHHHH", 16, "ELF header")
        ph_fmt, ph_size = "<IIQQQQQQ", 56
    else:
        (_, machine, _, entry, phoff, _, _, _, phentsize, phnum, _, _, _) = image.unpack(
            "<HHIIIIIHHHHHH", 16, "ELF header")
        ph_fmt, ph_size = "<IIIIIIII", 32
    if machine not in (EM_386, EM_X86_64):
        raise image.error(f"ELF machine {machine} is not x86")
    if phnum == 0 or phnum > MAX_PHDRS or phentsize != ph_size:
        raise image.error(f"bad program header table: {phnum} entries of {phentsize} bytes")
    segments = []
    for i in range(phnum):
        f = image.unpack(ph_fmt, phoff + i * ph_size, f"program header {i}")
        if ei_class == ELFCLASS64:
            seg = Segment(type=f[0], offset=f[2], vaddr=f[3], paddr=f[4], filesz=f[5], memsz=f[6])
        else:
            seg = Segment(type=f[0], offset=f[1], vaddr=f[2], paddr=f[3], filesz=f[4], memsz=f[5])
        if seg.type in (PT_LOAD, PT_NOTE):
            if seg.filesz > seg.memsz and seg.type == PT_LOAD:
                raise image.error(f"segment {i}: file size {seg.filesz:#x} > memory size {seg.memsz:#x}")
            image.slice(seg.offset, seg.filesz, f"segment {i}")   # raises if past the end
        segments.append(seg)
    return ElfImage(bits=64 if ei_class == ELFCLASS64 else 32, entry=entry, segments=tuple(segments))


def notes(image: ImageBytes, elf: ElfImage) -> list[Note]:
    """All notes in PT_NOTE segments."""
    found = []
    for seg in elf.segments:
        if seg.type != PT_NOTE:
            continue
        blob = image.slice(seg.offset, seg.filesz, "note segment")
        pos = 0
        while pos + 12 <= len(blob):
            namesz, descsz, ntype = ImageBytes(image.path, blob).unpack("<III", pos, "note header")
            name_end = pos + 12 + namesz
            desc_start = pos + 12 + (namesz + 3) // 4 * 4
            desc_end = desc_start + descsz
            if desc_end > len(blob):
                raise image.error(f"note at segment offset {pos:#x} runs past its segment")
            found.append(Note(blob[pos + 12:name_end].rstrip(b"\0"), ntype, blob[desc_start:desc_end]))
            pos = desc_start + (descsz + 3) // 4 * 4
    return found


def load_segments(mem: GuestMemory, image: ImageBytes, elf: ElfImage,
                  low_window: tuple[int, int] | None = None) -> tuple[list[BootRegion], int]:
    """Copy each PT_LOAD to its physical address and zero its bss; (regions, highest end).
    Below 1 MiB only inside `low_window` (multiboot: its loader moves its tables out of the way)."""
    loads = elf.loads
    if not loads:
        raise image.error("ELF file has no loadable segments")
    regions, top = [], 0
    for seg in loads:
        if seg.paddr < HIMEM_START and not (low_window is not None and
                                            low_window[0] <= seg.paddr <= seg.paddr + seg.memsz <= low_window[1]):
            where = "" if low_window is None else f" (outside [{low_window[0]:#x}, {low_window[1]:#x}))"
            raise image.error(f"segment at {seg.paddr:#x} overlaps the loader's tables below 1 MiB{where}")
        check_fits(mem, image.path, f"segment at {seg.paddr:#x}", seg.paddr, seg.memsz)
    for seg in loads:
        mem.write(seg.paddr, image.slice(seg.offset, seg.filesz, "segment"))
        mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz, 0)
        regions.append(BootRegion("kernel", seg.paddr, seg.memsz))
        top = max(top, seg.paddr + seg.memsz)
    return regions, top
