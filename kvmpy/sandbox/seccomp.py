"""Installing a seccomp filter on the calling thread (prctl + seccomp(2) through ctypes).

Filters are per thread (no SECCOMP_FILTER_FLAG_TSYNC): each kind of thread gets its own, and a
thread it starts inherits it (a console flusher started by a vCPU is held to the vCPU's rules).
A kill is logged by the kernel (audit type 1326, in `dmesg` or the audit log: the thread's name,
set here to kvmpy-<kind>, and the syscall number), so a killed kvmpy leaves a line saying which
thread kind made which call. Refusals (EPERM) are not logged by the kernel (SECCOMP_FILTER_FLAG_LOG
would also log every clone3 answered ENOSYS, once per thread started): kvmpy sees them as the
OSError of the call that was refused, and reports it where that call's error goes.
"""
from __future__ import annotations

import ctypes
import platform
import struct
import threading

from kvmpy.errors import KvmpyError
from kvmpy.sandbox.bpf import RET_ALLOW, RET_KILL_PROCESS, Insn, pack

SYS_SECCOMP = 317            # x86-64
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_ACTION_AVAIL = 2
PR_SET_NAME = 15
PR_GET_SECCOMP = 21
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int


class SandboxError(KvmpyError):
    """A seccomp filter could not be installed, or the kernel cannot sandbox at all."""


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _prctl(option: int, arg: int | bytes = 0) -> int:
    ret = _libc.prctl(ctypes.c_int(option), arg if isinstance(arg, bytes) else ctypes.c_ulong(arg),
                      ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0))
    return -ctypes.get_errno() if ret < 0 else ret


def _seccomp(operation: int, flags: int, arg: ctypes.c_void_p | int | None) -> int:
    ret = _libc.syscall(ctypes.c_long(SYS_SECCOMP), ctypes.c_uint(operation), ctypes.c_uint(flags), arg)
    return -ctypes.get_errno() if ret < 0 else ret


def install(prog: list[Insn], thread_name: str | None = None) -> None:
    """Filter every later call of this thread through `prog` (and name the thread for the logs)."""
    if thread_name:
        _prctl(PR_SET_NAME, thread_name.encode()[:15])
    ret = _prctl(PR_SET_NO_NEW_PRIVS, 1)       # required without CAP_SYS_ADMIN (after --runas)
    if ret < 0:
        raise SandboxError("entering the sandbox", errno=-ret, detail="PR_SET_NO_NEW_PRIVS")
    code = pack(prog)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    ret = _seccomp(SECCOMP_SET_MODE_FILTER, 0, ctypes.byref(fprog))
    if ret < 0:
        raise SandboxError(f"entering the sandbox{f' for {thread_name}' if thread_name else ''}", errno=-ret,
                           detail="seccomp(SECCOMP_SET_MODE_FILTER)")


_support: list[str | None] = []


def unsupported_reason() -> str | None:
    """Why this host cannot sandbox kvmpy's threads, or None when it can. Checked once, by
    installing an allow-everything filter on a throwaway thread (a container's own filter may
    forbid seccomp(2) even where the kernel has it)."""
    if _support:
        return _support[0]
    reason: str | None = None
    if platform.machine() != "x86_64":
        reason = f"kvmpy's seccomp filters are written for x86-64, this is {platform.machine()}"
    elif _prctl(PR_GET_SECCOMP) < 0:
        reason = "the kernel has no seccomp (CONFIG_SECCOMP)"
    else:
        action = ctypes.c_uint32(RET_KILL_PROCESS)
        if _seccomp(SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action)) < 0:
            reason = "the kernel lacks seccomp filters that kill the process (Linux < 4.14)"
        else:
            failures: list[str] = []

            def probe() -> None:
                try:
                    install([(0x06, 0, 0, RET_ALLOW)])
                except SandboxError as e:
                    failures.append(str(e))
            t = threading.Thread(target=probe, name="kvmpy-sandbox-probe")
            t.start()
            t.join()
            reason = failures[0] if failures else None
    _support.append(reason)
    return reason


assert struct.calcsize("<HBBI") == 8    # struct sock_filter
