"""The /dev/kvm system object: API version, capabilities, CPUID/MSR lists, VM creation."""
from __future__ import annotations

import errno as errno_mod
import os

from kvmpy.errors import IoctlError, KvmUnavailableError
from kvmpy.ioctl import request_numbers as nr
from kvmpy.ioctl._fd import FdObject
from kvmpy.ioctl._kvm import ffi, lib

EXPECTED_API_VERSION = lib.KVM_API_VERSION


def open_kvm_device(path: str) -> int:
    """Open the KVM device, turning the usual failures into one plain sentence."""
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno_mod.ENOENT:
            hint = "the device does not exist: is the kvm module loaded, or is this a container without it?"
        elif e.errno in (errno_mod.EACCES, errno_mod.EPERM):
            hint = "permission denied: add this user to the 'kvm' group or run as root"
        else:
            hint = None
        raise KvmUnavailableError(f"opening {path}", errno=e.errno, detail=hint) from None


class Kvm(FdObject):
    """System-level KVM handle. Use as a context manager or call close()."""

    def __init__(self, path: str = "/dev/kvm"):
        super().__init__(open_kvm_device(path), path)
        self.path = path
        version = self.api_version()
        if version != EXPECTED_API_VERSION:
            self.close()
            raise KvmUnavailableError(f"opening {path}",
                                      detail=f"KVM API version {version}, expected {EXPECTED_API_VERSION}")

    def api_version(self) -> int:
        return self._call_int("KVM_GET_API_VERSION", nr.KVM_GET_API_VERSION)

    def check_extension(self, cap: int) -> int:
        """0 when unsupported; otherwise 1 or a capability-specific value (e.g. a count)."""
        return self._call_int("KVM_CHECK_EXTENSION", nr.KVM_CHECK_EXTENSION, cap)

    def vcpu_mmap_size(self) -> int:
        return self._call_int("KVM_GET_VCPU_MMAP_SIZE", nr.KVM_GET_VCPU_MMAP_SIZE)

    def supported_cpuid(self, max_entries: int = 256):
        """struct kvm_cpuid2 * holding every CPUID leaf KVM can expose (grown on E2BIG)."""
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"entries": max_entries})
            cpuid.nent = max_entries
            try:
                self._call("KVM_GET_SUPPORTED_CPUID", nr.KVM_GET_SUPPORTED_CPUID, cpuid)
                return cpuid
            except IoctlError as e:
                if e.errno != errno_mod.E2BIG or max_entries >= 4096:
                    raise
                max_entries *= 2

    def msr_index_list(self) -> list[int]:
        """The MSR indices KVM saves/restores for a vCPU."""
        probe = ffi.new("struct kvm_msr_list *", {"indices": 0})
        probe.nmsrs = 0
        ret = lib.kvmpy_ioctl(self.fd, nr.KVM_GET_MSR_INDEX_LIST, probe)
        if ret < 0 and -ret != errno_mod.E2BIG:
            raise IoctlError(f"KVM_GET_MSR_INDEX_LIST on {self.label}", errno=-ret)
        count = probe.nmsrs
        lst = ffi.new("struct kvm_msr_list *", {"indices": count})
        lst.nmsrs = count
        self._call("KVM_GET_MSR_INDEX_LIST", nr.KVM_GET_MSR_INDEX_LIST, lst)
        return [lst.indices[i] for i in range(lst.nmsrs)]

    def create_vm(self, machine_type: int = 0) -> "Vm":
        from kvmpy.ioctl.vm import Vm
        fd = self._call_int("KVM_CREATE_VM", nr.KVM_CREATE_VM, machine_type)
        return Vm(fd, self)
