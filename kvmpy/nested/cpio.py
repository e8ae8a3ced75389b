"""A minimal cpio "newc" archive writer: the format the kernel unpacks as an initramfs.

Written here instead of driving cpio(1) so archives need no root (device nodes such as
/dev/console are plain entries) and are byte-for-byte reproducible (fixed mtimes, sorted).
"""
from __future__ import annotations

import stat
from dataclasses import dataclass, field

from kvmpy.errors import NestedError

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class CpioEntry:
    """One archive member; `data` is file content or a symlink target."""

    path: str
    mode: int
    data: bytes = b""
    rdev_major: int = 0
    rdev_minor: int = 0


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _header(ino: int, entry: CpioEntry, name: bytes) -> bytes:
    fields = [ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0,
              entry.rdev_major, entry.rdev_minor, len(name) + 1, 0]
    return b"070701" + b"".join(f"{v:08X}".encode() for v in fields)


@dataclass
class CpioArchive:
    """Collects entries, adds missing parent directories, writes newc bytes."""

    entries: dict[str, CpioEntry] = field(default_factory=dict)

    def _add(self, entry: CpioEntry) -> None:
        path = entry.path.strip("/")
        if not path or ".." in path.split("/"):
            raise NestedError("building a cpio archive", detail=f"bad member path {entry.path!r}")
        parts = path.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent not in self.entries:
                self.entries[parent] = CpioEntry(parent, stat.S_IFDIR | 0o755)
        self.entries[path] = CpioEntry(path, entry.mode, entry.data,
                                       entry.rdev_major, entry.rdev_minor)

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._add(CpioEntry(path, stat.S_IFDIR | perm))

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(CpioEntry(path, stat.S_IFREG | perm, data))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(CpioEntry(path, stat.S_IFLNK | 0o777, target.encode()))

    def add_char_device(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(CpioEntry(path, stat.S_IFCHR | perm, b"", major, minor))

    def to_bytes(self) -> bytes:
        out = bytearray()
        for ino, path in enumerate(sorted(self.entries), start=1):
            entry = self.entries[path]
            name = path.encode()
            head = _header(ino, entry, name) + name + b"\0"
            out += head + _pad4(len(head)) + entry.data + _pad4(len(entry.data))
        trailer = CpioEntry(_TRAILER, 0)
        head = _header(0, trailer, _TRAILER.encode()) + _TRAILER.encode() + b"\0"
        out += head + _pad4(len(head))
        return bytes(out)
