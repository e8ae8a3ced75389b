"""The kernel loaders (bzImage, PVH ELF, multiboot ELF32 and a.out kludge) through
load_kernel(), the way `kvmpy boot --kernel K [--initrd I] --append C` calls them, on a file
holding the input. Seeds are the synthetic images tests/tier0/test_boot_support.py builds from
the specifications, so mutations start from headers the loaders accept. Oracle: only
KvmpyError (BootError) escapes, nothing is written outside guest RAM, and what a loader
accepts is bootable as it says: every region inside RAM, the entry point inside a kernel
region, the command line and the initrd really in memory where the entry says.
"""
from __future__ import annotations

import os
import struct

import common

with common.instrumented("kvmpy.boot"):
    from kvmpy.boot import load_kernel
    from kvmpy.errors import KvmpyError


RAM = 32 << 20
MEM = common.guarded_memory([(0, RAM)])
WORKDIR = common.scratch_dir("loaders")
KERNEL = os.path.join(WORKDIR, "kernel")
INITRD = os.path.join(WORKDIR, "initrd")
INITRD2 = os.path.join(WORKDIR, "initrd2")


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    # layout: cmdline length (mod 41; +128: the initrd is given as two multiboot modules, the
    # second the first's tail, with arguments), initrd length (0: no initrd), cmdline, initrd, kernel
    cmd_len, initrd_len, modules = data[0] % 41, data[1], data[0] >= 128
    cmdline = data[2:2 + cmd_len].decode("latin-1").replace("\0", "")
    initrd = data[2 + cmd_len:2 + cmd_len + initrd_len] if initrd_len else None
    kernel = data[2 + cmd_len + initrd_len:]
    with open(KERNEL, "wb") as f:
        f.write(kernel)
    spec = None
    if initrd is not None:
        with open(INITRD, "wb") as f:
            f.write(initrd)
        spec = INITRD
        if modules:
            with open(INITRD2, "wb") as f:
                f.write(initrd[len(initrd) // 2:])
            spec = f"{INITRD} {cmdline[:8]},{INITRD2}"
    try:
        entry = load_kernel(MEM, KERNEL, cmdline, spec)
    except KvmpyError:
        return
    finally:
        MEM.check_guards()
    for r in entry.regions:
        if r.size < 0 or not MEM.contains(r.gpa, r.size):
            raise AssertionError(f"{entry.kind}: region {r} is not inside RAM")
    if not any(r.name == "kernel" and r.gpa <= entry.rip < r.end for r in entry.regions if r.size):
        raise AssertionError(f"{entry.kind}: entry {entry.rip:#x} is in no kernel region")
    region = entry.region("cmdline")
    if region is None or MEM.read(region.gpa, region.size) != cmdline.encode() + b"\0":
        raise AssertionError(f"{entry.kind}: the command line is not where the entry says")
    if initrd and spec == INITRD:
        region = entry.region("initrd")
        if region is None or MEM.read(region.gpa, region.size) != initrd:
            raise AssertionError(f"{entry.kind}: the initrd is not where the entry says")


def seeds() -> common.Seeds:
    import sys
    sys.path.insert(0, str(common.REPO_ROOT / "tests" / "tier0"))
    from test_boot_support import make_bzimage, make_elf, multiboot_header
    images = [
        make_bzimage(payload=b"\x90" * 2048, init_size=0x100000),
        make_bzimage(version=0x0206, header_end=0x23C, xloadflags=0, payload=b"\x90" * 1024),
        make_elf([(0x1000000, b"\xF4" * 512, 0x2000)], 0x1000000, notes=[(b"Xen", 18, struct.pack("<Q", 0x1000000))]),
        multiboot_header(1 << 16 | 3, (0x100000, 0x100000, 0, 0x100400, 0x100020)) + b"\xF4" * 512,
        make_elf([(0x100000, multiboot_header(3) + b"\xF4" * 256, 0x1000)], 0x100000, bits=32),
    ]
    for image in images:
        yield b"\x0d\x08console=ttyS012345678" + image
        yield b"\x8d\x08console=ttyS012345678" + image
        yield b"\x00\x00" + image


if __name__ == "__main__":
    common.main(test_one_input, seeds)
