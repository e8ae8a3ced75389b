"""cache=none when the kernel refuses O_DIRECT I/O (EINVAL): both data paths fall back to the
page cache, log once and close the O_DIRECT fd (no /dev/kvm).

A seccomp filter makes preadv/pwritev on the O_DIRECT fds fail with EINVAL, as a device with
larger logical blocks would. Filters cannot be removed, so the requests run in a child process.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import platform
import struct
import subprocess
import sys
from pathlib import Path

import pytest

IMAGE = bytes(range(256)) * 256          # 64 KiB
HDR, DATA, STATUS = 0x70000, 0x72000, 0x7F000
SYSCALLS = (295, 296, 327, 328)          # x86-64 preadv, pwritev, preadv2, pwritev2
AUDIT_ARCH_X86_64 = 0xC000003E
NO_SECCOMP = 77                          # the child's exit status when filters are unavailable


def refuse_io_on(fds: list[int]) -> None:
    """Install a seccomp filter: the preadv family on `fds` fails with EINVAL; all else runs."""
    ld, jeq, ret = 0x20, 0x15, 0x06
    allow, einval = 0x7FFF0000, 0x00050000 | 22
    prog = [(ld, 0, 0, 4), (jeq, 0, len(SYSCALLS) + 1, AUDIT_ARCH_X86_64), (ld, 0, 0, 0)]
    prog += [(jeq, len(SYSCALLS) - i, 0, nr) for i, nr in enumerate(SYSCALLS)]
    prog += [(ret, 0, 0, allow), (ld, 0, 0, 16)]  # args[0], low half: the fd
    prog += [(jeq, len(fds) - i, 0, fd) for i, fd in enumerate(fds)]
    prog += [(ret, 0, 0, allow), (ret, 0, 0, einval)]
    code = ctypes.create_string_buffer(b"".join(struct.pack("<HBBI", *i) for i in prog))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(prog), ctypes.addressof(code))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0):  # NO_NEW_PRIVS, SECCOMP
        raise OSError(ctypes.get_errno(), "installing the seccomp filter")


def child(tmp: Path) -> dict:
    """Both paths, one world each: an aligned read and an aligned write under the filter."""
    from kvmpy.devices.virtio import fastpath
    from kvmpy.devices.virtio.blk import T_IN, T_OUT, DriveSpec, VirtioBlk
    from support.mock_driver import BumpAllocator, MockPciDriver
    from kvmpy.devices.virtio.transport import VirtioPciDevice
    from kvmpy.memslots import GuestMemory

    worlds = {}
    for name in ("python", "c"):
        fastpath.ENABLED = name == "c"
        path = tmp / f"{name}.img"
        path.write_bytes(IMAGE)
        mem = GuestMemory.create(1 << 20)
        blk = VirtioBlk(DriveSpec(str(path), cache="none"))
        dev = VirtioPciDevice(blk, mem)
        (q,) = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000)).start(1)
        worlds[name] = (path, mem, blk, dev, q)
    try:
        refuse_io_on([w[2].direct_fd for w in worlds.values()])
    except OSError as e:
        print(f"seccomp unavailable: {e}", file=sys.stderr)
        sys.exit(NO_SECCOMP)
    out = {}
    for name, (path, mem, blk, dev, q) in worlds.items():
        logs: list[str] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = lambda r: logs.append(r.getMessage().replace(str(path), "IMG"))  # type: ignore[method-assign]
        logging.getLogger("kvmpy").addHandler(handler)
        used = []
        for rtype, sector, segs in ((T_IN, 8, [(DATA, 8192, True)]), (T_OUT, 32, [(DATA, 4096, False)])):
            mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
            q.add([(HDR, 16, False)] + segs + [(STATUS, 1, True)])
            dev.handle_notify(0)
            used += q.used() + [mem.read(STATUS, 1)[0]]
        logging.getLogger("kvmpy").removeHandler(handler)
        out[name] = {"used": used, "logs": logs, "direct_fd": blk.direct_fd, "direct": blk.direct_requests,
                     "read_ok": mem.read(DATA, 8192) == IMAGE[4096:12288],
                     "written_ok": path.read_bytes()[16384:20480] == mem.read(DATA, 4096),
                     "c_completed": blk._cblk.completed if blk._cblk is not None else 0}
    return out


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the filter names x86-64 syscall numbers")
def test_einval_from_o_direct_falls_back_identically(tmp_path):
    r = subprocess.run([sys.executable, __file__, str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(str(Path(__file__).resolve().parents[i]) for i in (2, 1))})
    if r.returncode == NO_SECCOMP:
        pytest.skip(r.stderr.strip().splitlines()[-1])
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    py, c = out["python"], out["c"]
    assert c.pop("c_completed") == 2 and py.pop("c_completed") == 0  # the C loop did its two requests
    assert py == c
    assert py["used"][1] == 0 and py["used"][3] == 0  # both statuses OK
    assert py["read_ok"] and py["written_ok"] and py["direct_fd"] == -1 and py["direct"] == 1
    assert py["logs"] == ["IMG: O_DIRECT refused ([Errno 22] Invalid argument); using the page cache"]


if __name__ == "__main__":
    print(json.dumps(child(Path(sys.argv[1]))))
