"""Shared plumbing for fd-owning KVM objects: ioctl calls that raise IoctlError with context."""
from __future__ import annotations

import os
from typing import Any

from kvmpy.errors import IoctlError
from kvmpy.ioctl._kvm import ffi, lib

_ioctl = lib.kvmpy_ioctl
_ioctl_arg = lib.kvmpy_ioctl_arg


class FdObject:
    """Owns one file descriptor; every ioctl failure names the request and this object."""

    kind = "fd"

    def __init__(self, fd: int, label: str):
        self.fd = fd
        self.label = label

    def _call(self, name: str, request: int, arg: Any = ffi.NULL) -> int:
        """ioctl with a pointer argument (cdata or NULL); returns the non-negative result."""
        fd = self.fd
        if fd < 0:
            raise IoctlError(f"{name} on {self.label}", detail="object is closed")
        ret = _ioctl(fd, request, arg)
        if ret < 0:
            raise IoctlError(f"{name} on {self.label}", errno=-ret)
        return ret

    def _call_int(self, name: str, request: int, value: int = 0) -> int:
        """ioctl whose argument is passed by value (an integer, not a pointer)."""
        fd = self.fd
        if fd < 0:
            raise IoctlError(f"{name} on {self.label}", detail="object is closed")
        ret = _ioctl_arg(fd, request, value)
        if ret < 0:
            raise IoctlError(f"{name} on {self.label}", errno=-ret)
        return ret

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "FdObject":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: os may already be gone
            pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.label} fd={self.fd}>"
