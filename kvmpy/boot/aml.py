"""A tiny ACPI Machine Language (AML) encoder: just what kvmpy's DSDT needs.

Covers data objects (integers, strings, EISA ids, packages, buffers), named objects
(Name, Scope, Device) and ResourceTemplate descriptors (small I/O port, Word/DWord address
space, end tag), encoded per ACPI 6.x chapters 6.4 (resource data) and 20 (AML grammar).
No methods: everything the guest evaluates is a constant, so the OS's interpreter never
runs kvmpy-provided code.
"""
from __future__ import annotations

import struct
from typing import Sequence, Union

from kvmpy.errors import BootError

# AML opcodes (ACPI 6.x section 20.3)
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP = 0x08, 0x10, 0x11, 0x12
EXT_OP_PREFIX, DEVICE_OP = 0x5B, 0x82
ROOT_CHAR, PARENT_PREFIX, DUAL_NAME_PREFIX, MULTI_NAME_PREFIX = 0x5C, 0x5E, 0x2E, 0x2F

# Resource descriptor tags (ACPI 6.x section 6.4)
IO_PORT_TAG = 0x47          # small item, type 0x08, length 7
END_TAG = 0x79              # small item, type 0x0F, length 1
DWORD_ADDRESS_TAG = 0x87
WORD_ADDRESS_TAG = 0x88
ADDRESS_SPACE_MEMORY, ADDRESS_SPACE_IO, ADDRESS_SPACE_BUS = 0, 1, 2
ADDR_FLAG_CONSUMER = 1 << 0      # else producer (a bridge window)
ADDR_FLAG_MIN_FIXED = 1 << 2
ADDR_FLAG_MAX_FIXED = 1 << 3
IO_RANGE_ENTIRE = 0x3            # type-specific flags of an I/O range: ISA and non-ISA ports
MEM_READ_WRITE = 0x1             # type-specific flags of a memory range: RW, non-cacheable

PKG_LENGTH_MAX = (1 << 28) - 1
_LEAD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ_")
_NAME_CHARS = _LEAD_CHARS | frozenset("0123456789")

AmlObject = Union[int, str, "RawAml"]


class RawAml(bytes):
    """Bytes that are already AML (an EISA id's encoding, a buffer, a nested package)."""


def pkg_length(body_len: int) -> bytes:
    """PkgLength for a body of `body_len` bytes; the encoded length counts its own bytes."""
    for extra in range(4):
        total = body_len + 1 + extra
        if extra == 0 and total <= 0x3F:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise BootError("encoding AML", detail=f"a {body_len}-byte package exceeds {PKG_LENGTH_MAX} bytes")


def name_seg(seg: str) -> bytes:
    """One 4-character NameSeg: leading A-Z or '_', then A-Z, 0-9 or '_', padded with '_'."""
    if not 1 <= len(seg) <= 4:
        raise BootError("encoding AML", detail=f"name segment {seg!r} must be 1..4 characters")
    seg = seg.ljust(4, "_")
    if seg[0] not in _LEAD_CHARS or not all(c in _NAME_CHARS for c in seg):
        raise BootError("encoding AML", detail=f"invalid name segment {seg!r}")
    return seg.encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString from an ASL-style path: '\\_SB.PCI0', '_S5', '^FOO'."""
    prefix = b""
    while path.startswith(("\\", "^")):
        prefix += bytes([ROOT_CHAR if path[0] == "\\" else PARENT_PREFIX])
        path = path[1:]
    segs = [name_seg(s) for s in path.split(".")] if path else []
    if not segs:
        return prefix + b"\x00"                      # NullName
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise BootError("encoding AML", detail=f"path {path!r} has too many segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


def integer(value: int) -> bytes:
    """The shortest AML encoding of an unsigned integer below 2**64."""
    if not 0 <= value < 1 << 64:
        raise BootError("encoding AML", detail=f"integer {value} is outside 0..2**64-1")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    for prefix, fmt, limit in ((BYTE_PREFIX, "<B", 1 << 8), (WORD_PREFIX, "<H", 1 << 16),
                               (DWORD_PREFIX, "<I", 1 << 32)):
        if value < limit:
            return bytes([prefix]) + struct.pack(fmt, value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    data = text.encode("ascii")
    if b"\x00" in data or any(b > 0x7F for b in data):
        raise BootError("encoding AML", detail=f"string {text!r} must be NUL-free ASCII")
    return bytes([STRING_PREFIX]) + data + b"\x00"


def eisa_id(text: str) -> RawAml:
    """EISAID("PNP0A03"): three letters of 5 bits each and four hex digits, as a DWord."""
    if len(text) != 7 or not all("A" <= c <= "Z" for c in text[:3]):
        raise BootError("encoding AML", detail=f"EISA id {text!r} must look like PNP0A03")
    try:
        product = int(text[3:], 16)
    except ValueError:
        raise BootError("encoding AML", detail=f"EISA id {text!r} must end in 4 hex digits") from None
    vendor = ((ord(text[0]) - 0x40) << 10) | ((ord(text[1]) - 0x40) << 5) | (ord(text[2]) - 0x40)
    return RawAml(integer(int.from_bytes(struct.pack(">HH", vendor, product), "little")))


def data_object(obj: AmlObject) -> bytes:
    if isinstance(obj, RawAml):
        return bytes(obj)
    if isinstance(obj, bool) or not isinstance(obj, (int, str)):
        raise BootError("encoding AML", detail=f"cannot encode {type(obj).__name__} as a data object")
    return integer(obj) if isinstance(obj, int) else string(obj)


def package(elements: Sequence[AmlObject]) -> RawAml:
    """Package (N) {...} with N = len(elements) (at most 255)."""
    if len(elements) > 255:
        raise BootError("encoding AML", detail=f"a package of {len(elements)} elements needs VarPackage")
    body = bytes([len(elements)]) + b"".join(data_object(e) for e in elements)
    return RawAml(bytes([PACKAGE_OP]) + pkg_length(len(body)) + body)


def buffer(data: bytes) -> RawAml:
    body = integer(len(data)) + data
    return RawAml(bytes([BUFFER_OP]) + pkg_length(len(body)) + body)


def name(path: str, obj: AmlObject) -> bytes:
    """Name (path, obj)."""
    return bytes([NAME_OP]) + name_string(path) + data_object(obj)


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


# -- resource descriptors ---------------------------------------------------------------------
def _check_range(what: str, lo: int, hi: int, limit: int) -> None:
    if not 0 <= lo <= hi < limit:
        raise BootError("encoding an ACPI resource", detail=f"{what} [{lo:#x}, {hi:#x}] is invalid")


def io_port(base: int, length: int, alignment: int = 1) -> bytes:
    """IO (Decode16, base, base, alignment, length): a fixed range the device consumes."""
    _check_range("I/O port range", base, base + max(length, 1) - 1, 1 << 16)
    if not 0 <= length <= 0xFF or not 0 <= alignment <= 0xFF:
        raise BootError("encoding an ACPI resource", detail=f"I/O length {length} / alignment {alignment}")
    return struct.pack("<BBHHBB", IO_PORT_TAG, 1, base, base, alignment, length)


def word_address(space: int, lo: int, hi: int, type_flags: int = 0,
                 general_flags: int = ADDR_FLAG_MIN_FIXED | ADDR_FLAG_MAX_FIXED) -> bytes:
    """WordBusNumber / WordIO: a 16-bit range (a producer window unless flags say consumer)."""
    _check_range("word address range", lo, hi, 1 << 16)
    return struct.pack("<BHBBBHHHHH", WORD_ADDRESS_TAG, 13, space, general_flags, type_flags,
                       0, lo, hi, 0, hi - lo + 1)


def dword_address(space: int, lo: int, hi: int, type_flags: int = 0,
                  general_flags: int = ADDR_FLAG_MIN_FIXED | ADDR_FLAG_MAX_FIXED) -> bytes:
    """DWordMemory / DWordIO: a 32-bit range."""
    _check_range("dword address range", lo, hi, 1 << 32)
    return struct.pack("<BHBBBIIIII", DWORD_ADDRESS_TAG, 23, space, general_flags, type_flags,
                       0, lo, hi, 0, hi - lo + 1)


def resource_template(*descriptors: bytes) -> RawAml:
    """ResourceTemplate () {...}: the descriptors plus an end tag (checksum 0 = not checked)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
