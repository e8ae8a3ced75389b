"""Tier 0: the machine-level parts of a snapshot (VM, vCPU and machine state, the identity a
destination checks) through the codec, and the identity checks against hostile values."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import KvmpyError, MigrationError
from kvmpy.ioctl._kvm import ffi
from kvmpy.machine.devices import DeviceTable
from kvmpy.machine.snapshot import MachineIdentity, MachineState, _check_cpuid, check_identity, check_sizes
from kvmpy.machine.vmstate import IRQCHIP_BYTES, PIT_BYTES, VmState
from kvmpy.migrate.codec import encode_state
from kvmpy.migrate.decoder import decode_state
from kvmpy.vcpu.state import BLOCKS, LAPIC_BYTES, VcpuState

HOST_CPUID = [(1, 0, 0, 0x000806F8, 0, 0x7FFAFBFF, 0x178BFBFF), (7, 0, 1, 0, 0x219C97A9, 0, 0)]


def vcpu_state(i: int = 0) -> VcpuState:
    blocks = {name: bytes([i + 1]) * ffi.sizeof(ctype) for name, ctype in BLOCKS.items()}
    return VcpuState(vcpu_id=i, xsave=b"\x07" * 4096, lapic=b"\x02" * LAPIC_BYTES,
                     msrs={0x10: 123456789, 0xC0000080: 0xD01}, nested=None, **blocks)


def vm_state() -> VmState:
    chip = lambda n: n.to_bytes(4, "little") + bytes(IRQCHIP_BYTES - 4)   # noqa: E731
    return VmState(chip(0), chip(1), chip(2), b"\x05" * PIT_BYTES, 123_456_789_000)


def identity(**over) -> MachineIdentity:
    base = dict(memory=64 << 20, smp=2, ram_ranges=[[0, 64 << 20]],
                devices=[["com1", "isa-serial", {}], ["virtio-disk0", "virtio-blk-pci",
                                                      {"readonly": False, "serial": "", "size": 4096}]],
                cpuid=[[list(HOST_CPUID[0]), list(HOST_CPUID[1])]] * 2)
    base.update(over)
    return MachineIdentity(**base)


def fake_machine(devices=(("com1", "isa-serial", {}), ("virtio-disk0", "virtio-blk-pci",
                                                        {"readonly": False, "serial": "", "size": 4096})),
                 memory=64 << 20, smp=2):
    table = DeviceTable()
    for id_, kind, config in devices:
        table.add(id_, kind, None, config=config)
    return SimpleNamespace(config=SimpleNamespace(memory=memory, smp=smp), board=SimpleNamespace(devices=table))


def test_machine_state_round_trips_through_the_codec():
    state = MachineState(vm_state(), [vcpu_state(0), vcpu_state(1)], {"com1": None})
    back = decode_state(encode_state(state))
    assert back == state and isinstance(back.vcpus[1], VcpuState)
    back.vm.validate()
    for v in back.vcpus:
        v.validate(xsave_bytes=4096)
    ident = identity()
    assert decode_state(encode_state(ident)) == ident


def test_identity_accepts_the_same_machine():
    check_identity(identity(), fake_machine(), HOST_CPUID)


@pytest.mark.parametrize("saved,machine,needle", [
    (identity(memory=128 << 20), fake_machine(), "128 MiB of RAM, this machine 64 MiB"),
    (identity(smp=1), fake_machine(), "1 vCPUs, this machine 2"),
    (identity(devices=[["com1", "isa-serial", {}]]), fake_machine(), "virtio-disk0.*which the snapshot lacks"),
    (identity(), fake_machine(devices=[("com1", "isa-serial", {})]), "virtio-disk0.*which this machine lacks"),
    (identity(), fake_machine(devices=[("com1", "isa-serial", {}), ("virtio-disk0", "virtio-blk-pci",
                                                                    {"readonly": True, "serial": "", "size": 4096})]),
     "device virtio-disk0 differs"),
    (identity(cpuid=[[[1, 0, 0, 0, 0, 0x00000400, 0]]] * 2), fake_machine(), r"CPUID\[0x1.0\].ecx bits 0x400\b"),
    (identity(devices="nonsense"), fake_machine(), "lacks"),
    (identity(devices=[[1, 2]]), fake_machine(), "malformed"),
    (identity(devices=[[["unhashable"], "k", {}]]), fake_machine(), "malformed"),
    (identity(memory="64M"), fake_machine(), "memory is '64M'"),
    (identity(smp=True), fake_machine(), "smp is True"),
    (identity(cpuid=[[["x"]]] * 2), fake_machine(), "CPUID table is malformed"),
    ("not an identity", fake_machine(), "identity is a str"),
])
def test_identity_mismatches_are_named(saved, machine, needle):
    with pytest.raises(MigrationError, match=needle):
        check_identity(saved, machine, HOST_CPUID)


def test_cpuid_bits_kvmpy_sets_itself_are_not_missing_on_the_host():
    """The hypervisor bit (and TSC-deadline, HTT, CMP_LEGACY) come from kvmpy, not from
    KVM_GET_SUPPORTED_CPUID: a snapshot carrying them fits this host."""
    _check_cpuid([[[1, 0, 0, 0, 0, 0x81000000 | HOST_CPUID[0][5], HOST_CPUID[0][6] | 1 << 28]]] * 2, 2,
                 [(1, 0, 0, 0, 0, HOST_CPUID[0][5] & ~(1 << 31), HOST_CPUID[0][6] & ~(1 << 28))])


def test_sizes_are_checked_before_anything_is_built():
    with pytest.raises(MigrationError, match="MiB of RAM"):
        check_sizes(identity(), 128 << 20, 2)
    check_sizes(identity(), 64 << 20, 2)


_values = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
                       | st.binary(max_size=8), lambda inner: st.lists(inner, max_size=4), max_leaves=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(["memory", "smp", "ram_ranges", "devices", "cpuid", "kvmpy_version"]), value=_values)
def test_a_hostile_identity_field_is_refused_or_harmless(field, value):
    """Any value in any identity field: refused with a KvmpyError, never another exception."""
    saved = identity(**{field: value})
    blob = encode_state(saved)
    try:
        check_identity(decode_state(blob), fake_machine(), HOST_CPUID)
    except KvmpyError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_identity_blobs_fail_cleanly(data):
    blob = bytearray(encode_state(identity()))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    try:
        check_identity(decode_state(bytes(blob)), fake_machine(), HOST_CPUID)
    except KvmpyError:
        pass


def test_cpuid_tables_of_the_wrong_count_are_refused():
    with pytest.raises(MigrationError, match="malformed"):
        _check_cpuid([[list(HOST_CPUID[0])]], 2, HOST_CPUID)
