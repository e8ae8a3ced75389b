"""QEMU's spelling where QEMU users look for it: `--device isa-debug-exit,iobase=PORT,iosize=N`
with QEMU's defaults and semantics (a write of 1-4 bytes anywhere in the window exits with
(v << 1) | 1), next to kvmpy's own debug-exit at 0x501 and the legacy probe sinks."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from kvmpy.devices import debug_exit as dx
from kvmpy.errors import ConfigError
from kvmpy.machine.config import parse_device_args
from kvmpy.machine.platform import _carve


@pytest.mark.parametrize("text, spec", [
    ("isa-debug-exit", dx.DebugExitSpec(0x501, 2)),
    ("isa-debug-exit,iobase=0xf4,iosize=0x04", dx.DebugExitSpec(0xF4, 4)),
    ("isa-debug-exit,iosize=4,iobase=244", dx.DebugExitSpec(244, 4)),
    ("isa-debug-exit,iobase=0364", dx.DebugExitSpec(0o364, 2)),
])
def test_isa_debug_exit_is_spelled_as_in_qemu(text, spec):
    assert parse_device_args([text]) == ("/dev/kvm", [spec])


def test_a_path_still_names_the_kvm_device():
    assert parse_device_args(["/dev/kvm2", "isa-debug-exit"]) == ("/dev/kvm2", [dx.DebugExitSpec()])
    assert parse_device_args([]) == ("/dev/kvm", [])


@pytest.mark.parametrize("text, reason", [
    ("e1000", "not a device kvmpy has; it has isa-debug-exit"),
    ("isa-debug-exit,iobase=zz", "is not a number"),
    ("isa-debug-exit,port=1", "the properties are iobase=PORT and iosize=N"),
    ("isa-debug-exit,iobase=0xffff,iosize=4", "not a window in the 16-bit port space"),
    ("isa-debug-exit,iosize=0", "not a window"),
])
def test_bad_devices_are_one_clear_error(text, reason):
    with pytest.raises(ConfigError, match=reason):
        parse_device_args([text])


def test_qemu_window_exits_at_any_offset_kvmpys_default_only_at_zero():
    codes = []
    qemu = dx.DebugExit(codes.append, window=4)
    qemu.write(3, b"\x01")
    qemu.write(1, b"\x02\x00")
    qemu.write(4, b"\x09")           # outside the window: ignored
    qemu.write(0, b"\x01" * 5)       # wider than 4 bytes: ignored
    assert codes == [3, 5]
    default = dx.DebugExit(codes.append)
    default.write(1, b"\x01")
    assert codes == [3, 5]


@given(st.integers(0, 0x3FF), st.integers(1, 0x40),
       st.lists(st.tuples(st.integers(0, 0x3FF), st.integers(1, 0x40)), max_size=3))
def test_carve_keeps_every_port_outside_the_holes_exactly_once(base, length, holes):
    pieces = _carve(base, length, holes)
    covered = [p for b, n in pieces for p in range(b, b + n)]
    expected = [p for p in range(base, base + length) if not any(hb <= p < hb + hn for hb, hn in holes)]
    assert covered == expected and all(n > 0 for _, n in pieces)
