"""The state codec (kvmpy/migrate/codec.py) and every device's restore(), as a restore from an
untrusted stream meets them: the input is a CONFIG/STATE payload, decoded; a decoded state is
handed to restore() of a live device of its kind (the device table of the tier-0 state tests,
tests/tier0/device_cases.py, every device driven into a non-reset state). Seeds are the real
encoded states of those devices. Oracle: only KvmpyError escapes decode and restore (restore
validates everything first), nothing is written outside guest RAM, and a state restore()
accepted encodes again and restores again to the same state.
"""
from __future__ import annotations

import sys
from pathlib import Path

import common

sys.path.insert(0, str(common.REPO_ROOT / "tests" / "tier0"))
with common.instrumented("kvmpy.migrate.codec", "kvmpy.devices", "kvmpy.state"):
    import device_cases  # tests/tier0: the device table (its kvmpy imports get instrumented)
    from kvmpy.errors import KvmpyError
    from kvmpy.migrate.codec import encode_state
    from kvmpy.migrate.decoder import decode_state

MEM = common.guarded_memory([(0, device_cases.RAM)])
ENV = device_cases.Env(MEM, Path(common.scratch_dir("codec")))
DEVICES: dict[type, object] = {}
SEEDS: list[bytes] = []
for _name in device_cases.CASES:
    _dev = device_cases.driven(_name, ENV)
    _state = _dev.state()
    DEVICES[type(_state)] = _dev
    SEEDS.append(encode_state(_state))


def test_one_input(data: bytes) -> None:
    try:
        state = decode_state(data)
    except KvmpyError:
        return
    dev = DEVICES.get(type(state))
    if dev is None:
        return                  # a nested state (a queue, PCI config) on its own: nothing restores it alone
    try:
        dev.restore(state)
    except KvmpyError:
        return
    finally:
        MEM.check_guards()
    again = dev.state()
    decoded = decode_state(encode_state(again))
    dev.restore(decoded)
    if dev.state() != again:
        raise AssertionError(f"{type(state).__name__}: a restored state does not restore to itself")
    MEM.check_guards()


def seeds() -> common.Seeds:
    return SEEDS


if __name__ == "__main__":
    common.main(test_one_input, seeds)
