"""zstd for the live migration's `compress` capability, through the system's libzstd (ctypes:
one-shot ZSTD_compress / ZSTD_decompress of a memory chunk, at most a few MiB).

Why libzstd and not a Python package: nothing to install (every Debian has libzstd1, systemd
needs it), and a chunk is compressed in one call with the GIL released. Decompression is given
the exact size the stream announced (bounded by the reader's limits before anything is
allocated), so a hostile frame can neither grow past it nor come out short unnoticed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

from kvmpy.errors import MigrationError

LEVEL = 1                       # fast: guest pages compress well even at level 1
_lib: Any = None


def _load() -> Any:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("zstd") or "libzstd.so.1"
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise MigrationError("zstd compression", detail=f"libzstd is not available ({exc})") from None
        lib.ZSTD_compressBound.restype = ctypes.c_size_t
        lib.ZSTD_compressBound.argtypes = [ctypes.c_size_t]
        lib.ZSTD_compress.restype = ctypes.c_size_t
        lib.ZSTD_compress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.ZSTD_decompress.restype = ctypes.c_size_t
        lib.ZSTD_decompress.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_getErrorName.restype = ctypes.c_char_p
        lib.ZSTD_getErrorName.argtypes = [ctypes.c_size_t]
        _lib = lib
    return _lib


def available() -> bool:
    try:
        _load()
        return True
    except MigrationError:
        return False


def bound(size: int) -> int:
    """The largest a compressed `size`-byte input can be."""
    return int(_load().ZSTD_compressBound(size))


def compress(data: Any, level: int = LEVEL) -> bytes:
    lib = _load()
    src = bytes(data)
    out = ctypes.create_string_buffer(bound(len(src)))
    n = lib.ZSTD_compress(out, len(out), src, len(src), level)
    if lib.ZSTD_isError(n):
        raise MigrationError("zstd compression", detail=lib.ZSTD_getErrorName(n).decode())
    return out.raw[:n]


def decompress_into(frame: Any, out: memoryview) -> None:
    """Decompress `frame` into exactly all of `out` (a writable byte view), or MigrationError."""
    lib = _load()
    src = bytes(frame)
    dst = (ctypes.c_char * len(out)).from_buffer(out)
    try:
        n = lib.ZSTD_decompress(dst, len(out), src, len(src))
    finally:
        del dst
    if lib.ZSTD_isError(n):
        raise MigrationError("reading the migration stream",
                             detail=f"a compressed memory chunk is corrupt ({lib.ZSTD_getErrorName(n).decode()})")
    if n != len(out):
        raise MigrationError("reading the migration stream",
                             detail=f"a compressed memory chunk holds {n} bytes, not the {len(out)} announced")
