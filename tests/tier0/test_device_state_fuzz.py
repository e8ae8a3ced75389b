"""Property: any one field of a device's state, anywhere in the nesting, replaced by anything a
stream could carry (or a stray float or object), is either refused with StateError, leaving the
device exactly as it was, or accepted, and then the device's state is sound (it restores into a
fresh device unchanged, through the stream codec). Never another exception: a migration stream
is untrusted input."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from device_cases import CASES, RAM, Env, assert_plain, driven
from hypothesis_budget import examples
from kvmpy.devices.virtio.rng import RngState
from kvmpy.errors import StateError
from kvmpy.memslots import GuestMemory
from kvmpy.migrate import codec, decoder

Path = tuple[Any, ...]      # attribute names and list indices from the state's root


def paths(value: Any, path: Path = ()) -> Iterator[Path]:
    """Every place in a state a stream could put something else: each field, each list entry
    (not inside tuples: an i8042 output entry is replaced whole)."""
    if path:
        yield path
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from paths(getattr(value, f.name), path + (f.name,))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from paths(item, path + (i,))


def get(root: Any, path: Path) -> Any:
    for step in path:
        root = root[step] if isinstance(step, int) else getattr(root, step)
    return root


def put(root: Any, path: Path, value: Any) -> None:
    parent, last = get(root, path[:-1]), path[-1]
    if isinstance(last, int):
        parent[last] = value
    else:
        setattr(parent, last, value)


def near(original: Any) -> st.SearchStrategy:
    """Values a hostile stream would try for this place: off-by-a-little, top bits, wrong type."""
    anything = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.binary(max_size=300),
                         st.text(max_size=4), st.floats(allow_nan=True), st.lists(st.integers(0, 300), max_size=3),
                         st.just(RngState()), st.just(object()))
    if isinstance(original, bool):
        return st.one_of(st.just(not original), anything)
    if isinstance(original, int):
        return st.one_of(st.integers(-2, 2).map(lambda d: original + d),
                         st.integers(0, 70).map(lambda b: original ^ (1 << b)), anything)
    if isinstance(original, bytes):
        return st.one_of(st.integers(0, max(len(original), 1)).map(lambda n: original[:n] + b"\xff" * (n % 3)),
                         st.integers(0, max(len(original) - 1, 0)).map(
                             lambda i: original[:i] + bytes([original[i] ^ 0x80]) + original[i + 1:] if original else b"\x80"),
                         anything)
    return anything


@pytest.fixture
def mem():
    m = GuestMemory.create(RAM)
    yield m
    m.close()


@pytest.mark.parametrize("name", list(CASES))
@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_one_hostile_field_anywhere(name, mem, tmp_path, data):
    mem.fill(0, RAM, 0)
    env = Env(mem, tmp_path)
    try:
        dev = driven(name, env)
        good = dev.state()
        where = data.draw(st.sampled_from(list(paths(good))), label="path")
        value = data.draw(near(get(good, where)), label="value")
        hostile = copy.deepcopy(good)
        put(hostile, where, value)
        try:
            dev.restore(hostile)
        except StateError:
            event("refused")
            assert dev.state() == good
            return
        event("accepted")
        accepted = dev.state()
        assert_plain(accepted)
        fresh = CASES[name].make(env)
        fresh.restore(decoder.decode_state(codec.encode_state(accepted)))
        assert fresh.state() == accepted
    finally:
        env.close()
