"""One error family for kvmpy: every failure carries what was being done and, if any, an errno.

Callers at the edge (the CLI, the monitor) turn these into one-line messages; nothing below
them prints or exits.
"""
from __future__ import annotations

import errno as _errno
import os


class KvmpyError(Exception):
    """Base of every kvmpy error. `context` says what was being done; `errno` is set when a
    system call failed."""

    def __init__(self, context: str, errno: int | None = None, detail: str | None = None):
        self.context = context
        self.errno = errno
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        msg = self.context
        if self.errno is not None:
            name = _errno.errorcode.get(self.errno, str(self.errno))
            msg += f": {os.strerror(self.errno)} ({name})"
        if self.detail:
            msg += f": {self.detail}"
        return msg


class KvmUnavailableError(KvmpyError):
    """/dev/kvm is missing or not accessible."""


class IoctlError(KvmpyError):
    """A KVM or vhost ioctl failed."""


class GuestMemoryError(KvmpyError):
    """A guest-physical access fell outside guest RAM (often a hostile or buggy guest)."""


class BusError(KvmpyError):
    """A device range could not be registered (overlap, empty range)."""


class BootError(KvmpyError):
    """A kernel, initrd or boot image could not be loaded."""


class ConfigError(KvmpyError):
    """The user's configuration is invalid (bad flag value, missing file)."""


class StateError(KvmpyError):
    """A saved device or vCPU state failed validation on restore."""


class DeviceError(KvmpyError):
    """A device backend failed (image file, TAP, host entropy)."""


class NestedError(KvmpyError):
    """The nested hardware-KVM harness failed (L1 did not boot, timed out, command failed)."""


class MigrationError(KvmpyError):
    """A migration stream was corrupt, truncated or incompatible."""
