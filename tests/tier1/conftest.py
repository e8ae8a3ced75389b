"""Tier 1: tiny guests on the host's /dev/kvm.

Whether tier 1 can run is decided from facts outside kvmpy (kvm_host.py: the device node exists
and this process may open it read/write). When it can, any failure of kvmpy to open it (an
inverted version check, a wrong ioctl number) is a test failure, never a skip.
"""
from __future__ import annotations

import pytest

from kvm_host import host_kvm_unusable_reason
from kvmpy.ioctl import Kvm
from kvmpy.vcpu.runner import install_kick_signal
from support.tinyguest import TinyTestVm


@pytest.fixture(scope="session")
def kvm_available() -> None:
    reason = host_kvm_unusable_reason()
    if reason is not None:
        pytest.skip(reason)
    Kvm().close()  # the host's /dev/kvm is usable: kvmpy failing to open it is kvmpy's bug
    install_kick_signal()


@pytest.fixture
def tiny(kvm_available):
    vm = TinyTestVm.create()
    yield vm
    vm.close()
