"""Tier 1: QMP set_link on a real Machine with a --nic (a TAP kvmpy makes; the counter guest has no
virtio driver, so only the device's side is seen): the NIC named by its device id goes down and
up, an unknown name is QEMU's DeviceNotFound, and a link set down stays down across a reset,
which rebuilds the board's devices (QEMU keeps a link down across system_reset)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvmpy.devices.virtio.netspec import parse_nic_spec
from kvmpy.monitor.client import QmpCommandError

COUNTER = Path(__file__).resolve().parents[1] / "guest" / "out" / "counter.elf"


def nic_device(vm):
    entry = next(e for e in vm.devices if e.id == "net0")
    return getattr(entry.device, "device", entry.device)     # the PCI function wraps the VirtioNet


def test_qmp_set_link_reaches_the_nic_and_outlives_a_reset(kvm_available, kvm_machine):
    assert COUNTER.exists(), "make -C tests/guest builds the counter guest"
    name = f"kvsl{int(time.monotonic() * 1000) % 100000}"
    vm = kvm_machine(kernel=str(COUNTER), memory="64M", qmp=True,
                     nics=[parse_nic_spec(f"tap,ifname={name},vhost=off")])
    vm.console.expect(r"tick 00000001", timeout=20)
    assert nic_device(vm).link_up
    with pytest.raises(QmpCommandError, match="DeviceNotFound.*Device 'net1' not found"):
        vm.qmp.execute("set_link", {"name": "net1", "up": False})
    assert vm.qmp.execute("set_link", {"name": "net0", "up": False}) == {}
    assert nic_device(vm).link_up is False
    first = nic_device(vm)
    vm.qmp.execute("system_reset")
    vm.console.expect(r"counter guest\n", timeout=20)
    assert vm.boots == 2 and nic_device(vm) is not first, "the reset kept the old device"
    assert nic_device(vm).link_up is False, "a reset brought a link set down back up"
    assert vm.qmp.execute("set_link", {"name": "net0", "up": True}) == {}
    assert nic_device(vm).link_up is True
