"""Facts about the host's /dev/kvm found without kvmpy: whether this process can open it
(os.stat/os.open) and what KVM_CHECK_EXTENSION answers, issued here with the numbers from
<linux/kvm.h>. Tier 1 decides skips from these, never from kvmpy's own answers."""
from __future__ import annotations

import errno
import fcntl
import os
import stat

KVM_PATH = "/dev/kvm"
# <linux/kvm.h>: _IO(KVMIO=0xAE, n)
KVM_CREATE_VM = 0xAE01
KVM_CHECK_EXTENSION = 0xAE03
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0


def host_kvm_unusable_reason(path: str = KVM_PATH) -> str | None:
    """None when `path` is a character device this process can open read/write, else the
    environmental reason (worded as tests/skipcheck.py allows)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"no /dev/kvm on this host ({path} does not exist)"
    if not stat.S_ISCHR(st.st_mode):
        return f"no /dev/kvm on this host ({path} is not a character device)"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except PermissionError:
        return f"no read/write permission on /dev/kvm (uid {os.getuid()}, mode {st.st_mode & 0o777:o})"
    except OSError as e:
        if e.errno in (errno.ENXIO, errno.ENODEV):  # node left behind without the kvm module
            return f"no /dev/kvm on this host (opening it: {os.strerror(e.errno)})"
        raise
    os.close(fd)
    return None


def host_check_extension(cap: int, on_vm: bool = False) -> int:
    """KVM_CHECK_EXTENSION issued here, with the header's numbers (on a fresh VM fd when the
    capability is VM-scoped): the host's answer, independent of kvmpy's ioctl layer."""
    sys_fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        if not on_vm:
            return fcntl.ioctl(sys_fd, KVM_CHECK_EXTENSION, cap)
        vm_fd = fcntl.ioctl(sys_fd, KVM_CREATE_VM, 0)
        try:
            return fcntl.ioctl(vm_fd, KVM_CHECK_EXTENSION, cap)
        finally:
            os.close(vm_fd)
    finally:
        os.close(sys_fd)
