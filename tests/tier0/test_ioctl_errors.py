"""Opening failures and closed objects give clear KvmpyErrors (no /dev/kvm needed)."""
from __future__ import annotations

import os

import pytest

from kvmpy.errors import IoctlError, KvmUnavailableError
from kvmpy.ioctl import Kvm
from kvmpy.ioctl._fd import FdObject
from kvmpy.ioctl import request_numbers as numbers


def test_missing_device_names_the_path_and_hints(tmp_path):
    with pytest.raises(KvmUnavailableError) as info:
        Kvm(str(tmp_path / "nokvm"))
    assert "nokvm" in str(info.value)
    assert info.value.errno == 2
    assert "does not exist" in str(info.value)


def test_permission_denied_hints_at_group(monkeypatch):
    import kvmpy.ioctl.system as system

    def denied(path, flags):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(system.os, "open", denied)
    with pytest.raises(KvmUnavailableError, match="kvm' group") as info:
        Kvm("/dev/kvm")
    assert info.value.errno == 13


def test_ioctl_on_a_non_kvm_fd_raises_with_errno(tmp_path):
    fd = os.open(tmp_path / "plain", os.O_RDWR | os.O_CREAT)
    obj = FdObject(fd, "plain-file")
    with pytest.raises(IoctlError) as info:
        obj._call_int("KVM_GET_API_VERSION", numbers.KVM_GET_API_VERSION)
    assert info.value.errno == 25  # ENOTTY
    assert "KVM_GET_API_VERSION on plain-file" in str(info.value)
    obj.close()
    assert obj.fd == -1
    with pytest.raises(IoctlError, match="closed"):
        obj._call_int("KVM_GET_API_VERSION", numbers.KVM_GET_API_VERSION)
