"""Tier 1: tiny guests on the host's /dev/kvm. Skipped, with the reason, when it cannot be opened."""
from __future__ import annotations

import pytest

from kvmpy.errors import KvmUnavailableError
from kvmpy.ioctl import Kvm
from kvmpy.vcpu.runner import install_kick_signal
from kvmpy.vcpu.tinyguest import TinyVm


@pytest.fixture(scope="session")
def kvm_available():
    try:
        Kvm().close()
    except KvmUnavailableError as e:
        pytest.skip(f"/dev/kvm cannot be opened: {e}")
    install_kick_signal()


@pytest.fixture
def tiny(kvm_available):
    vm = TinyVm.create()
    yield vm
    vm.close()
