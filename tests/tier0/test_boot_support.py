"""Builders for synthetic kernel images used by the test_boot_* files (no tests here).

Every image is built from the documented layouts (boot.rst setup header, ELF, multiboot), so the
tests check the loaders against the specifications rather than against a downloaded kernel.
"""
from __future__ import annotations

import struct
from pathlib import Path

LOADED_HIGH = 1
XLF_KERNEL_64 = 1


def make_bzimage(*, version: int = 0x020F, setup_sects: int = 4, payload: bytes = b"\x90" * 8192,
                 loadflags: int = LOADED_HIGH, xloadflags: int = XLF_KERNEL_64, relocatable: int = 1,
                 kernel_alignment: int = 0x200000, pref_address: int = 0x1000000, init_size: int = 0x400000,
                 initrd_addr_max: int = 0x7FFFFFFF, cmdline_size: int = 2047, syssize: int | None = None,
                 header_end: int = 0x26C, boot_flag: int = 0xAA55) -> bytes:
    """A bzImage: boot sector + setup sectors (with the setup header) + protected-mode payload."""
    sects = setup_sects or 4
    setup = bytearray((sects + 1) * 512)
    struct.pack_into("<B", setup, 0x1F1, setup_sects)
    struct.pack_into("<I", setup, 0x1F4, (len(payload) + 15) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FE, boot_flag)
    setup[0x200] = 0xEB                                   # jmp short past the header
    setup[0x201] = header_end - 0x202
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<B", setup, 0x211, loadflags)
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    struct.pack_into("<B", setup, 0x234, relocatable)
    struct.pack_into("<B", setup, 0x235, 21)
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<Q", setup, 0x258, pref_address)
    struct.pack_into("<I", setup, 0x260, init_size)
    return bytes(setup) + payload


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    name_z = name + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(name_z), len(desc), ntype) + pad(name_z) + pad(desc)


def make_elf(segments: list[tuple[int, bytes, int]], entry: int, *, bits: int = 64,
             notes: list[tuple[bytes, int, bytes]] = (), vaddr_offset: int = 0) -> bytes:
    """An ELF executable: segments are (paddr, file bytes, memsz); notes go in one PT_NOTE."""
    ehsize, phsize = (64, 56) if bits == 64 else (52, 32)
    phnum = len(segments) + (1 if notes else 0)
    data_off = ehsize + phnum * phsize
    blobs, phdrs = bytearray(), []
    for paddr, data, memsz in segments:
        phdrs.append((1, data_off + len(blobs), paddr + vaddr_offset, paddr, len(data), memsz))
        blobs += data + bytes(-len(data) % 16)
    if notes:
        note_blob = b"".join(_note(*n) for n in notes)
        phdrs.append((4, data_off + len(blobs), 0, 0, len(note_blob), len(note_blob)))
        blobs += note_blob
    ident = b"\x7fELF" + bytes([2 if bits == 64 else 1, 1, 1]) + bytes(9)
    if bits == 64:
        header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, ehsize, 0, 0, ehsize, phsize, phnum, 64, 0, 0)
        ph = b"".join(struct.pack("<IIQQQQQQ", t, 5, o, v, p, fs, ms, 0x1000) for t, o, v, p, fs, ms in phdrs)
    else:
        header = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, entry, ehsize, 0, 0, ehsize, phsize, phnum, 40, 0, 0)
        ph = b"".join(struct.pack("<IIIIIIII", t, o, v, p, fs, ms, 5, 0x1000) for t, o, v, p, fs, ms in phdrs)
    return header + ph + bytes(blobs)


def multiboot_header(flags: int, aout: tuple[int, int, int, int, int] | None = None) -> bytes:
    magic = 0x1BADB002
    hdr = struct.pack("<III", magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    return hdr + (struct.pack("<IIIII", *aout) if aout else b"")


def write(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)
