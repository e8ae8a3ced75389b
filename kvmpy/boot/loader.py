"""load_kernel(): detect the kernel's format and hand it to the right loader.

Order matters: a bzImage is recognised by its setup header; an ELF is booted through PVH when it
carries the PVH note (Linux vmlinux), else through multiboot when it has a multiboot header.
"""
from __future__ import annotations

import logging

from kvmpy.errors import BootError, GuestMemoryError
from kvmpy.boot.bzimage import is_bzimage, load_bzimage
from kvmpy.boot.entry import BootEntry
from kvmpy.boot.image import ImageBytes, initrd_modules, initrd_size, read_kernel
from kvmpy.memslots import GuestMemory
# The ELF, PVH and multiboot loaders are imported when a kernel needs them: start-up time counts
# (the nested harness runs Python ~30x slower) and most boots are bzImages.

log = logging.getLogger(__name__)


def detect_format(image: ImageBytes) -> str:
    """'bzimage', 'pvh' or 'multiboot'; BootError when the file is none of them."""
    if is_bzimage(image.data):
        return "bzimage"
    from kvmpy.boot.elf import is_elf, parse_elf
    from kvmpy.boot.multiboot import find_header
    from kvmpy.boot.pvh import pvh_entry_point
    if is_elf(image.data) and pvh_entry_point(image, parse_elf(image)) is not None:
        return "pvh"
    if find_header(image.data) is not None:
        return "multiboot"
    if is_elf(image.data):
        raise image.error("ELF file has neither a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY) "
                          "nor a multiboot header")
    raise image.error("not a kernel: no bzImage setup header, ELF header or multiboot header")


def load_kernel(mem: GuestMemory, kernel_path: str, cmdline: str,
                initrd_path: str | None = None) -> BootEntry:
    """Load a bzImage, PVH ELF or multiboot kernel (and initrd) into `mem`.

    Returns the BootEntry the boot vCPU must start with. Raises BootError, naming the file and
    the reason, for anything wrong with the inputs.
    """
    modules = initrd_modules(initrd_path) if initrd_path is not None else []
    for path, _ in modules:
        initrd_size(path)                 # fail on a missing initrd before loading anything
    image = read_kernel(kernel_path)
    fmt = detect_format(image)
    log.info("kernel %s is a %s", kernel_path, fmt)
    if fmt != "multiboot" and (len(modules) > 1 or (modules and modules[0][0] != initrd_path)):
        raise BootError(f"loading {kernel_path}", detail=f"--initrd {initrd_path!r} names several modules "
                                                         "(or arguments): only multiboot kernels take those")
    try:
        if fmt == "bzimage":
            return load_bzimage(mem, image, cmdline, initrd_path)
        if fmt == "pvh":
            from kvmpy.boot.elf import parse_elf
            from kvmpy.boot.pvh import load_pvh, pvh_entry_point
            elf = parse_elf(image)
            entry = pvh_entry_point(image, elf)
            assert entry is not None
            return load_pvh(mem, image, elf, entry, cmdline, initrd_path)
        from kvmpy.boot.multiboot import find_header, load_multiboot
        header = find_header(image.data)
        assert header is not None
        return load_multiboot(mem, image, header, cmdline, modules)
    except GuestMemoryError as e:
        raise BootError(f"loading {kernel_path}", detail=f"does not fit guest RAM: {e}") from None
