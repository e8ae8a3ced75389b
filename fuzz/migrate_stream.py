"""The snapshot / migration stream reader (kvmpy/migrate/reader.py), as a restore drives it:
header, then every section, CONFIG/STATE payloads through the state decoder, memory sections
copied into guarded guest RAM (64 KiB at 0 and 16 KiB at 4 GiB), DISK sections (block
migration) through the destination's BlockReceiver onto a scratch image. A stream is built from the
input section by section (kind, payload, and for MEMORY_RUNS/MEMORY_ZSTD a run table and page
data) with correct checksums nearly always, so mutations reach what lies behind the crc
checks, in stream format 2 (MEMORY_RUNS pages checked by the data hash) or 1 (by the crc); one input in eight is read from a regular file (the mappable path, sizes checked
against the file), the rest from a pipe-like buffer. Oracle: only KvmpyError escapes, nothing
is written outside guest RAM or past the image's end, and the reader ends (END, or an error) within the input.
"""
from __future__ import annotations

import io
import os
import struct
import zlib

import common

with common.instrumented("kvmpy.migrate"):
    from kvmpy.errors import KvmpyError
    from kvmpy.migrate import block, zstd
    from kvmpy.migrate.decoder import decode_state
    from kvmpy.migrate.pages import data_hash, hash_digest
    from kvmpy.memslots import GuestMemory
    from kvmpy.migrate.reader import StreamReader, check_file_ranges, verify_file_range
    from kvmpy.migrate.stream import (CHUNK_HEADER, DISK_HEADER, DISK_RUN, FILE_HEADER, FORMAT_VERSION, MAGIC, RANGE_ENTRY, RANGE_TABLE,
                                      SECTION_HEADER, ZERO_RUN, ZSTD_HEADER, SectionKind, section_crc)

import atheris

PAGE = 4096
RAM0, RAM1_GPA, RAM1 = 0x10000, 1 << 32, 0x4000
MEM = common.guarded_memory([(0, RAM0), (RAM1_GPA, RAM1)])
RANGES = [(0, MEM.arrays[0]), (RAM1_GPA, MEM.arrays[1])]
FILE = os.path.join(common.scratch_dir("stream"), "stream")
PIPE_LAYOUT = [(0, RAM0), (RAM1_GPA, RAM1)]     # read into guarded RAM
FILE_RAM = 1 << 20                              # mapped from the file: a layout ram_ranges() makes
FILE_LAYOUT = [(0, FILE_RAM)]
KINDS = [SectionKind.CONFIG, SectionKind.STATE, SectionKind.MEMORY_RUNS, SectionKind.MEMORY_RUNS,
         SectionKind.MEMORY_ZSTD, SectionKind.DISK, SectionKind.MEMORY_FILE, SectionKind.END]


def runs_payload(fdp: atheris.FuzzedDataProvider, version: int = 1) -> tuple[bytes, int]:
    """A MEMORY_RUNS payload, and how many of its bytes the section crc covers."""
    gpa = (0, RAM1_GPA, 0, fdp.ConsumeIntInRange(0, (1 << 64) - 1))[fdp.ConsumeIntInRange(0, 3)]
    nruns = fdp.ConsumeIntInRange(1, 4) if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
    table, pages = bytearray(), bytearray()
    for _ in range(min(nruns, 4)):
        first = fdp.ConsumeIntInRange(0, 20) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
        count = fdp.ConsumeIntInRange(0, 4) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, ZERO_RUN - 1)
        zero = fdp.ConsumeBool()
        table += struct.pack("<II", first, count | (ZERO_RUN if zero else 0))
        if not zero:
            pages += bytes([fdp.ConsumeIntInRange(0, 255)]) * (PAGE * min(count, 4))
    if fdp.ConsumeIntInRange(0, 15) == 0:
        pages = pages[:fdp.ConsumeIntInRange(0, len(pages))]
    if version == 1:
        return CHUNK_HEADER.pack(gpa, nruns, 0) + table + pages, -1
    digest = hash_digest(data_hash(0, pages)) if len(pages) % PAGE == 0 else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
    return CHUNK_HEADER.pack(gpa, nruns, digest) + table + pages, CHUNK_HEADER.size + len(table)


def memory_file_payload(fdp: atheris.FuzzedDataProvider, at: int, layout: list[tuple[int, int]]) -> bytes:
    """A range table, then padding to a page boundary and the ranges' bytes (offsets are
    relative to the stream's start, as the writer lays them out)."""
    count = fdp.ConsumeIntInRange(1, 2)
    layout = layout + [(RAM1_GPA, RAM1)] if len(layout) < 2 else layout
    table_end = at + SECTION_HEADER.size + RANGE_TABLE.size + count * RANGE_ENTRY.size
    offset = -(-table_end // PAGE) * PAGE
    entries, data_size = bytearray(), 0
    for gpa, size in layout[:count]:
        size = size if fdp.ConsumeIntInRange(0, 7) else PAGE * fdp.ConsumeIntInRange(0, 20)
        entries += RANGE_ENTRY.pack(gpa, size, offset + data_size, fdp.ConsumeIntInRange(0, 0xFFFFFFFF), 0)
        data_size += size
    body = bytes([fdp.ConsumeIntInRange(0, 3)]) * data_size
    return RANGE_TABLE.pack(count, 0) + bytes(entries) + bytes(offset - table_end) + body


class Disk:
    """The destination's drive 0 for block migration: a 64 KiB scratch image (the target checks
    after every input that nothing wrote past its end)."""
    index, readonly, image_bytes = 0, False, 0x10000

    def __init__(self) -> None:
        self.path = os.path.join(common.scratch_dir("stream"), "disk.img")
        with open(self.path, "wb") as f:
            f.truncate(self.image_bytes)
        self.fd = os.open(self.path, os.O_RDWR)

    def claim(self) -> None:
        pass


DISK = Disk()


def disk_payload(fdp: atheris.FuzzedDataProvider, first: bool) -> bytes:
    """A DISK section: a SETUP naming drives, or BLOCKS of runs (data or zero) for one drive. The
    first DISK section of a stream is usually the SETUP a source sends, so BLOCKS get written."""
    if first and fdp.ConsumeIntInRange(0, 3):
        return DISK_HEADER.pack(block.DISK_VERSION, block.SETUP, 1, 0) + DISK_RUN.pack(Disk.image_bytes, 0, 4096)
    version = block.DISK_VERSION if fdp.ConsumeIntInRange(0, 15) else fdp.ConsumeIntInRange(0, 255)
    kind = (block.SETUP, block.BLOCKS)[fdp.ConsumeIntInRange(0, 1)] if fdp.ConsumeIntInRange(0, 15) \
        else fdp.ConsumeIntInRange(0, 255)
    if kind == block.SETUP:
        entries = [(Disk.image_bytes if fdp.ConsumeIntInRange(0, 3) else 512 * fdp.ConsumeIntInRange(0, 300),
                    fdp.ConsumeIntInRange(0, 2), 1 << fdp.ConsumeIntInRange(8, 17))
                   for _ in range(fdp.ConsumeIntInRange(0, 3))]
        return DISK_HEADER.pack(version, kind, len(entries), 0) + b"".join(DISK_RUN.pack(*e) for e in entries)
    runs, data = [], bytearray()
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        offset = 512 * fdp.ConsumeIntInRange(0, 130) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, (1 << 64) - 1)
        length = 512 * fdp.ConsumeIntInRange(0, 16) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
        zero = fdp.ConsumeBool()
        flags = (block.ZERO if zero else 0) | (0 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFFFFFF))
        runs.append(DISK_RUN.pack(offset, length, flags))
        if not zero:
            data += bytes([fdp.ConsumeIntInRange(1, 255)]) * min(length, 8192)
    drive = 0 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
    return DISK_HEADER.pack(version, kind, drive, len(runs)) + b"".join(runs) + data


def build(data: bytes, layout: list[tuple[int, int]]) -> bytes:
    fdp = atheris.FuzzedDataProvider(data)
    version = FORMAT_VERSION if fdp.ConsumeBool() else 1
    header = FILE_HEADER.pack(MAGIC, version, 0)
    out = bytearray(header + struct.pack("<I", zlib.crc32(header)))
    if fdp.ConsumeIntInRange(0, 31) == 0:
        out = bytearray(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24)))
    sections = disk_sections = 0
    while fdp.remaining_bytes() and sections < 12:
        kind = KINDS[fdp.ConsumeIntInRange(0, len(KINDS) - 1)] if fdp.ConsumeIntInRange(0, 15) \
            else fdp.ConsumeIntInRange(0, 255)
        if kind == SectionKind.END:
            count = sections if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 20)
            payload = struct.pack("<Q", count)
        elif kind == SectionKind.MEMORY_RUNS:
            payload, covered = runs_payload(fdp, version)
        elif kind == SectionKind.MEMORY_ZSTD:
            raw, _ = runs_payload(fdp, version)
            payload = ZSTD_HEADER.pack(len(raw), 0) + (zstd.compress(raw) if zstd.available() else raw)
        elif kind == SectionKind.MEMORY_FILE:
            payload = memory_file_payload(fdp, len(out), layout)
        elif kind == SectionKind.DISK:
            payload = disk_payload(fdp, first=not disk_sections)
            disk_sections += 1
        else:
            payload = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 512))
        length = len(payload) if fdp.ConsumeIntInRange(0, 31) else fdp.ConsumeIntInRange(0, 1 << 40)
        if kind == SectionKind.MEMORY_FILE:       # the crc covers only the range table
            count = payload[0] if payload else 0
            crc = section_crc(kind, length, [payload[:RANGE_TABLE.size + count * RANGE_ENTRY.size]])
        elif kind == SectionKind.MEMORY_RUNS and covered >= 0:     # format 2: header and run table
            crc = section_crc(kind, length, [payload[:covered]])
        else:
            crc = section_crc(kind, length, [payload])
        if fdp.ConsumeIntInRange(0, 63) == 0:
            crc ^= 1
        out += SECTION_HEADER.pack(kind, b"\0\0\0", crc, length) + payload
        sections += 1
        if kind == SectionKind.END:
            break
    return bytes(out)


def test_one_input(data: bytes) -> None:
    from_file = data[:1] == b"\x07"
    stream = build(data, FILE_LAYOUT if from_file else PIPE_LAYOUT)
    MEM.clear()
    if from_file:
        with open(FILE, "wb") as f:
            f.write(stream)
        source = open(FILE, "rb")
    else:
        source = io.BytesIO(stream)
    receiver = block.BlockReceiver([DISK], lambda word, text: None, b"ok", b"no")
    try:
        reader = StreamReader(source)
        for _ in range(64):
            section = reader.next_section()
            if section is None:
                break
            if section.kind in (SectionKind.CONFIG, SectionKind.STATE):
                try:
                    decode_state(section.payload)
                except KvmpyError:
                    pass
            elif section.kind is SectionKind.DISK:
                receiver.handle(section.payload)
            elif section.kind is SectionKind.MEMORY_FILE and reader.mappable:
                map_like_restore(source, section)
            elif section.kind in (SectionKind.MEMORY_FILE, SectionKind.MEMORY_RUNS):
                reader.read_memory_into(section, RANGES)
        else:
            raise AssertionError("the reader returned 64 sections from a stream of at most 12")
    except KvmpyError:
        pass
    finally:
        source.close()
        MEM.check_guards()
        if os.fstat(DISK.fd).st_size != Disk.image_bytes:
            raise common.GuardViolation(f"block migration changed the destination image's size to "
                                        f"{os.fstat(DISK.fd).st_size} (it has {Disk.image_bytes} bytes)")


def map_like_restore(source, section) -> None:
    """What a restore from a snapshot file does (kvmpy/machine/snapshot.py): check the ranges,
    map them copy-on-write, then the guest touches every page; a mapping past the file's end
    would SIGBUS here, a finding libFuzzer reports as a deadly signal."""
    check_file_ranges(section.file_ranges, FILE_LAYOUT)
    mem = GuestMemory.map_file(FILE_RAM, source.fileno(), {r.gpa: r.file_offset for r in section.file_ranges})
    try:
        for r in section.file_ranges:
            verify_file_range(mem.buffer(r.gpa, r.size), r)
    except KvmpyError:
        pass
    finally:
        mem.close()


def seeds() -> common.Seeds:
    yield bytes(8)
    yield bytes([1, 2, 3, 4, 5, 6, 7]) * 20


if __name__ == "__main__":
    common.main(test_one_input, seeds)
