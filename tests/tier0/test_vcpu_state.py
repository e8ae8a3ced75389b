"""VcpuState is plain picklable data and restore-side validation rejects bad shapes."""
from __future__ import annotations

import dataclasses
import pickle

import pytest

from kvmpy.errors import StateError
from kvmpy.ioctl._kvm import ffi
from kvmpy.vcpu.state import BLOCKS, LAPIC_BYTES, VcpuState


def sample() -> VcpuState:
    blocks = {name: bytes(range(256)) * (ffi.sizeof(ct) // 256) + bytes(ffi.sizeof(ct) % 256)
              for name, ct in BLOCKS.items()}
    return VcpuState(vcpu_id=0, xsave=b"\x01" * 4096, lapic=b"\x02" * LAPIC_BYTES,
                     msrs={0x10: 123, 0xC0000080: 0x500}, **blocks)


def test_round_trip_through_pickle():
    state = sample()
    state.validate(xsave_bytes=4096)
    again = pickle.loads(pickle.dumps(state))
    assert again == state
    again.validate(xsave_bytes=4096)


@pytest.mark.parametrize("change", [
    {"regs": b"\x00" * 10}, {"sregs": "not bytes"}, {"xsave": b"\x00" * 100}, {"xsave": b"\x00" * 4098},
    {"lapic": b"\x00" * 5}, {"msrs": {0x10: -1}}, {"msrs": {1 << 32: 0}}, {"msrs": [(1, 2)]},
    {"vcpu_id": -1}, {"version": 99}])
def test_bad_shapes_are_rejected(change):
    state = dataclasses.replace(sample(), **change)
    with pytest.raises(StateError):
        state.validate()


def test_xsave_size_must_match_the_target_vcpu():
    with pytest.raises(StateError, match="xsave"):
        sample().validate(xsave_bytes=8192)


def test_lapic_is_optional():
    dataclasses.replace(sample(), lapic=None).validate()
