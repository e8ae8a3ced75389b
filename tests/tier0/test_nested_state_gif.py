"""Tier 0: SVM nested state outside guest mode with EFER.SVME clear loads with GIF set, the only
state KVM_SET_NESTED_STATE accepts there (kvmpy.vcpu.state.loadable_nested_state)."""
import struct

from kvmpy.vcpu import state as vstate


def header(flags: int, fmt: int) -> bytes:
    return struct.pack("<HHI", flags, fmt, 128) + bytes(120)


def test_gif_clear_outside_guest_mode_without_svme_loads_as_gif_set():
    loaded = vstate.loadable_nested_state(header(0, vstate.NESTED_FORMAT_SVM), efer=0xD01)
    assert struct.unpack_from("<HH", loaded) == (vstate.NESTED_GIF_SET, vstate.NESTED_FORMAT_SVM)
    assert loaded[2:] == header(0, vstate.NESTED_FORMAT_SVM)[2:]


def test_other_states_load_as_captured():
    for blob, efer in ((header(vstate.NESTED_GIF_SET, 1), 0xD01),          # already right
                       (header(0, 1), 0xD01 | vstate.EFER_SVME),           # SVME on: GIF may be clear
                       (header(vstate.NESTED_GUEST_MODE, 1), 0xD01),       # guest mode: KVM judges
                       (header(0, 0), 0xD01),                              # VMX format
                       (b"\x00", 0)):
        assert vstate.loadable_nested_state(blob, efer) == blob
