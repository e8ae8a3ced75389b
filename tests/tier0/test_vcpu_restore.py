"""set_vcpu_state validates the whole state before the first ioctl: a blob of the wrong size from a
migration stream would otherwise be copied into a fixed-size kernel struct (no /dev/kvm: a
recording stand-in for the vCPU)."""
from __future__ import annotations

import dataclasses

import pytest

from kvmpy.errors import StateError
from kvmpy.ioctl._kvm import ffi
from kvmpy.vcpu.state import BLOCKS, LAPIC_BYTES, VcpuState, set_vcpu_state

XSAVE_BYTES = 4096


class RecordingVcpu:
    """Every set_* call is recorded with the bytes it would hand to KVM."""

    id = 0
    xsave_bytes = XSAVE_BYTES

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes | dict]] = []
        self.vm = self

    def check_extension(self, cap: int) -> int:
        return 0

    def set_msrs_count(self, msrs: dict[int, int]) -> int:
        self.calls.append(("set_msrs", dict(msrs)))
        return len(msrs)

    def __getattr__(self, name: str):
        if not name.startswith("set_"):
            raise AttributeError(name)

        def record(cdata) -> None:
            self.calls.append((name, bytes(ffi.buffer(cdata)) if not isinstance(cdata, bytes) else cdata))
        return record


def sample() -> VcpuState:
    blocks = {name: bytes((i * 7 + len(name)) & 0xFF for i in range(ffi.sizeof(ctype)))
              for name, ctype in BLOCKS.items()}
    return VcpuState(vcpu_id=0, xsave=bytes(range(256)) * (XSAVE_BYTES // 256), lapic=b"\x02" * LAPIC_BYTES,
                     msrs={0x10: 123, 0xC0000080: 0x500}, **blocks)


def test_a_valid_state_is_loaded_block_for_block():
    vcpu, state = RecordingVcpu(), sample()
    set_vcpu_state(vcpu, state)
    loaded = dict(vcpu.calls)
    for name in BLOCKS:
        assert loaded[f"set_{name}"] == getattr(state, name), name
    assert loaded["set_xsave"] == state.xsave and loaded["set_lapic"] == state.lapic
    assert loaded["set_msrs"] == state.msrs


@pytest.mark.parametrize("name", sorted(BLOCKS) + ["lapic"])
@pytest.mark.parametrize("delta", [-1, -8])  # (a longer blob would overflow the C struct unchecked)
def test_a_wrong_sized_block_is_refused_before_any_ioctl(name, delta):
    size = LAPIC_BYTES if name == "lapic" else ffi.sizeof(BLOCKS[name])
    state = dataclasses.replace(sample(), **{name: b"\xAA" * (size + delta)})
    vcpu = RecordingVcpu()
    with pytest.raises(StateError, match=name):
        set_vcpu_state(vcpu, state)
    assert vcpu.calls == [], "the vCPU was touched before the state was validated"


@pytest.mark.parametrize("change", [{"xsave": b"\x01" * (XSAVE_BYTES + 4)}, {"xsave": b"\x01" * (XSAVE_BYTES - 4)},
                                    {"msrs": {1 << 32: 0}}, {"vcpu_id": -1}, {"version": 99}, {"regs": "text"}])
def test_other_bad_shapes_are_refused_before_any_ioctl(change):
    vcpu = RecordingVcpu()
    with pytest.raises(StateError):
        set_vcpu_state(vcpu, dataclasses.replace(sample(), **change))
    assert vcpu.calls == []


def test_not_a_vcpu_state_is_refused():
    vcpu = RecordingVcpu()
    with pytest.raises(StateError, match="VcpuState"):
        set_vcpu_state(vcpu, {"regs": b""})  # type: ignore[arg-type]
    assert vcpu.calls == []
