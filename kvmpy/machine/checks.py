"""The checks a configuration passes before anything is opened for writing.

"Validate everything first, open outputs last": every input (kernel, initrd, disk images, a
snapshot file) is looked at with stat() only, so a FIFO, a directory or a device where a file
belongs is refused with its real reason instead of hanging in open() or reading as "no such
file", and no output (a --serial file:, a console socket) may be one of those inputs, since
truncating it would destroy the user's kernel or disk. Pure stat()/path work: tier-0 testable.
"""
from __future__ import annotations

import errno
import logging
import os
import stat

from kvmpy.devices.console import parse_console_spec
from kvmpy.errors import ConfigError

log = logging.getLogger(__name__)

SECTOR = 512
_warned_partial_sector: set[tuple[int, int, int]] = set()   # (dev, ino, size): warn once per image


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words a user recognises."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "an unusual file"


def _stat(context: str, path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except OSError as e:
        detail = {errno.ENOENT: "no such file", errno.ELOOP: "a loop of symbolic links",
                  errno.ENAMETOOLONG: "the path is too long"}.get(e.errno or 0)
        raise ConfigError(context, errno=e.errno, detail=detail) from None


def check_input_file(what: str, path: str, allow_empty: bool = True) -> os.stat_result:
    """A kernel or initrd must be a readable regular file (a FIFO would block the read, a
    directory or device is a mistake); an initrd must not be empty."""
    context = f"checking the {what} {path!r}"
    st = _stat(context, path)
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(context, detail=f"it is {file_kind(st.st_mode)}, not a regular file")
    if not os.access(path, os.R_OK):
        raise ConfigError(context, errno=errno.EACCES)
    if not allow_empty and st.st_size == 0:
        raise ConfigError(context, detail="it is empty (0 bytes)")
    return st


def check_drives(paths: list[str]) -> None:
    """Every --drive is a regular file or a block device (a FIFO would block open(): a disk
    needs random access), no image is given twice (two virtio disks over one file corrupt it),
    and a size that is not a whole number of sectors is said out loud (the guest cannot see
    the tail, as in QEMU)."""
    seen: dict[tuple[int, int], str] = {}
    for path in paths:
        context = f"checking disk image {path!r}"
        st = _stat(context, path)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError(context, detail=f"it is {file_kind(st.st_mode)}; a disk image must be "
                                              "a regular file or a block device")
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise ConfigError(context, detail=f"the same image is already this VM's drive {seen[key]!r}: "
                                              "give each --drive its own image")
        seen[key] = path
        tail = st.st_size % SECTOR if stat.S_ISREG(st.st_mode) else 0
        if tail and (st.st_dev, st.st_ino, st.st_size) not in _warned_partial_sector:
            _warned_partial_sector.add((st.st_dev, st.st_ino, st.st_size))
            log.warning("disk image %s is %d bytes, not a multiple of %d: the guest does not see its "
                        "last %d bytes", path, st.st_size, SECTOR, tail)


def check_host_memory(size: int, meminfo: str = "/proc/meminfo") -> None:
    """One rule for every RAM backend: no more guest RAM than this host has (RAM + swap).
    Anonymous memory is refused beyond that by the kernel's overcommit check while a memfd is
    not, and a guest that touches its RAM would then be killed by the OOM killer halfway."""
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        host = sum(int(fields[k].split()[0]) << 10 for k in ("MemTotal", "SwapTotal") if k in fields)
    except (OSError, ValueError):
        return   # no /proc: nothing to compare with (the backends still refuse what they cannot map)
    if host and size > host:
        raise ConfigError("checking --memory", detail=f"{size >> 20} MiB is more than this host's "
                                                      f"{host >> 20} MiB of RAM and swap")


def console_outputs(serial: str, virtio_console: str | None) -> list[tuple[str, str, str]]:
    """(flag, kind, path) of every console that writes a file or binds a socket."""
    outputs = []
    for flag, spec in (("--serial", serial), ("--virtio-console", virtio_console)):
        if spec is None or spec == "capture":
            continue
        kind, path = parse_console_spec(spec)
        if kind in ("file", "unix"):
            outputs.append((flag, kind, path))
    return outputs


def check_consoles(serial: str, virtio_console: str | None) -> None:
    """Both specs parse (an empty --virtio-console is as wrong as an empty --serial), and two
    consoles never share one file or one socket path."""
    if virtio_console == "":
        raise ConfigError("parsing --virtio-console", detail="the spec is empty (use null to discard the output)")
    outputs = console_outputs(serial, virtio_console)
    if len(outputs) == 2 and same_path(outputs[0][2], outputs[1][2]):
        what = "socket" if "unix" in (outputs[0][1], outputs[1][1]) else "file"
        raise ConfigError("checking the consoles", detail=f"--serial and --virtio-console both name the "
                                                          f"{what} {outputs[0][2]!r}: give each its own path")


def check_outputs_apart(inputs: list[tuple[str, str]], outputs: list[tuple[str, str, str]]) -> None:
    """No output is one of the VM's inputs (a --serial file: over the kernel or a read-only disk
    would truncate it), and a socket path does not already hold something else."""
    ids = {}
    for what, path in inputs:
        try:
            st = os.stat(path)
        except OSError:
            continue   # the input's own check reports it
        ids[(st.st_dev, st.st_ino)] = what
    for flag, kind, path in outputs:
        try:
            st = os.stat(path)
        except OSError:
            continue   # does not exist yet: it is nobody's input
        context = f"checking {flag} {kind}:{path}"
        if (st.st_dev, st.st_ino) in ids:
            raise ConfigError(context, detail=f"it is {ids[(st.st_dev, st.st_ino)]}: an output must not "
                                              "overwrite one of the VM's inputs")
        if kind == "unix" and not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigError(context, detail=f"it exists and is {file_kind(st.st_mode)}, not a socket")
        if kind == "file" and stat.S_ISDIR(st.st_mode):
            raise ConfigError(context, detail="it is a directory")


def same_path(a: str, b: str) -> bool:
    """The same file (or, where one does not exist yet, the same resolved name)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)
