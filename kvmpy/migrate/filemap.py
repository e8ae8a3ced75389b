"""The file layout's RAM ranges (MEMORY_FILE, kvmpy.migrate.stream): what one is, the check that a
snapshot's ranges are exactly the machine's, mapping one copy-on-write, and verifying a mapped one.
Apart from kvmpy.migrate.reader, which finds the ranges in a stream and re-exports these."""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from typing import Any, BinaryIO, Sequence

from kvmpy.errors import MigrationError
from kvmpy.migrate.pages import memory_checksum


@dataclass(frozen=True)
class FileRange:
    """One RAM range of a MEMORY_FILE section: map `size` bytes of the file at `file_offset`
    (absolute, page-aligned) MAP_PRIVATE at guest-physical `gpa`."""
    gpa: int
    size: int
    file_offset: int
    checksum: int



def check_file_ranges(file_ranges: Sequence[FileRange], ram: Sequence[tuple[int, int]]) -> None:
    """Refuse, naming the first difference, unless a MEMORY_FILE section's RAM ranges are exactly
    the machine's [(gpa, size)]. Call it before mapping: a mapping sized from the machine but
    placed at a smaller range's offset would reach into other data or past the end of the file
    (SIGBUS when the guest touches it)."""
    theirs = {r.gpa: r.size for r in file_ranges}
    mine = dict(ram)
    for gpa, size in sorted(theirs.items()):
        if mine.get(gpa) != size:
            have = "nothing" if gpa not in mine else f"{mine[gpa]:#x} bytes"
            raise MigrationError("the snapshot does not fit this machine",
                                 detail=f"it has {size:#x} bytes of RAM at {gpa:#x}; this machine has {have} there")
    for gpa, size in sorted(mine.items()):
        if gpa not in theirs:
            raise MigrationError("the snapshot does not fit this machine",
                                 detail=f"this machine has {size:#x} bytes of RAM at {gpa:#x}; the snapshot has none")


def map_file_range(fileobj: BinaryIO, file_range: FileRange) -> mmap.mmap:
    """Map one MEMORY_FILE range copy-on-write (MAP_PRIVATE): pages are read from the file when
    the guest first touches them, and the guest's writes never reach the snapshot. The file must
    stay as it is while mapped (saving to the same file: URI renames a new file in, which is
    safe; truncating it in place is not: untouched pages past the new end would SIGBUS)."""
    try:
        return mmap.mmap(fileobj.fileno(), file_range.size, flags=mmap.MAP_PRIVATE,
                         prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=file_range.file_offset)
    except (OSError, ValueError) as exc:
        raise MigrationError(f"mapping RAM at {file_range.gpa:#x} from the snapshot",
                             errno=getattr(exc, "errno", None), detail=None if isinstance(exc, OSError) else str(exc)) from exc


def verify_file_range(buffer: Any, file_range: FileRange) -> None:
    """Check a mapped range against its checksum (reads all of it: a choice, not a default)."""
    if memory_checksum(buffer) != file_range.checksum:
        raise MigrationError(f"verifying RAM at {file_range.gpa:#x}", detail="checksum mismatch (corrupt snapshot)")
