"""The state codec: every value kind through encode/decode and back, and hostile blobs that must
end in MigrationError/StateError (never another exception, a long wait or a large allocation)."""
from __future__ import annotations

import dataclasses
import enum
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.errors import MigrationError, StateError
from kvmpy.migrate import codec
from kvmpy.migrate.codec import MAX_DEPTH, encode_state
from kvmpy.migrate.decoder import decode_state
from kvmpy.state import versioned


@versioned("test-codec-leaf", 1)
@dataclasses.dataclass
class Leaf:
    value: object
    label: str = ""


@versioned("test-codec-pair", 3)
@dataclasses.dataclass(frozen=True)
class Pair:
    left: object
    right: object


@versioned("test-codec-checked", 1)
@dataclasses.dataclass
class Checked:
    """Refuses a negative count in __post_init__, as a state class may."""
    count: int

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError("count must not be negative")


@dataclasses.dataclass
class Unregistered:
    value: int


class Colour(enum.IntEnum):
    RED = 1


def same(a: object, b: object) -> bool:
    """Equality that also insists on the same types (True == 1 and [1] != (1,) matter here)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(k1, k2) and same(a[k1], b[k2]) for k1, k2 in zip(a, b))
    if dataclasses.is_dataclass(a):
        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return a == b


def uvarint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def name(text: str) -> bytes:
    raw = text.encode()
    return uvarint(len(raw)) + raw


def state_blob(state_name: str, version: int, fields: dict[str, bytes]) -> bytes:
    """A state value written by hand from the documented format: fields are encoded values."""
    body = b"".join(name(k) + v for k, v in fields.items())
    return bytes([codec.T_STATE]) + name(state_name) + uvarint(version) + uvarint(len(fields)) + body


EDGE_VALUES = [
    None, True, False, 0, 1, 127, 128, 2**63, 2**64 - 1, -1, -128, -(2**63), -(2**64),
    "", "serial", "h\u00e9llo \u2603 \U0001F600", b"", b"\x00\xff" * 300, [], (), {},
    [1, (2, [3]), {"a": None}], (None,), {0: "zero", -5: b"x", "k": [True, False]},
    Leaf(1), Leaf([Leaf(None, "inner")], "outer"), Pair(Leaf(b"xsave" * 800), {7: Pair(1, 2)}),
    {"vcpus": [{"msrs": {0x10: 2**64 - 1, 0xC0000080: 0xD01}}] * 4},
]


@pytest.mark.parametrize("value", EDGE_VALUES, ids=lambda v: type(v).__name__)
def test_round_trip_every_kind(value):
    blob = encode_state(value)
    assert same(decode_state(blob), value)
    assert encode_state(decode_state(blob)) == blob          # one encoding per value


def test_buffers_encode_as_bytes():
    for buffer in (bytearray(b"abc"), memoryview(b"abc"), memoryview(b"xaxbxc")[1::2]):
        assert same(decode_state(encode_state(buffer)), bytes(buffer))
    assert decode_state(memoryview(encode_state([1, 2]))) == [1, 2]


ints = st.integers(min_value=-(2**64), max_value=2**64 - 1)
leaves = st.none() | st.booleans() | ints | st.text(max_size=20) | st.binary(max_size=40)
values = st.recursive(
    leaves,
    lambda children: (st.lists(children, max_size=5) | st.lists(children, max_size=5).map(tuple)
                      | st.dictionaries(ints | st.text(max_size=8), children, max_size=5)
                      | st.builds(Leaf, children, st.text(max_size=8))
                      | st.builds(Pair, children, children)),
    max_leaves=40)


@settings(max_examples=300, deadline=None)
@given(values)
def test_round_trip_property(value):
    assert same(decode_state(encode_state(value)), value)


@pytest.mark.parametrize("bad, where", [
    (1.5, "float"), ({1, 2}, "set"), (Colour.RED, "enum"), ([Unregistered(1)], "not registered"),
    (2**64, "outside"), (-(2**64) - 1, "outside"), ({True: 1}, "dict key"), ({1.0: 1}, "dict key"),
    ("\ud800", "UTF-8"), (Leaf({"x": [object()]}), "state.value['x'][0]"),
])
def test_encode_refuses_values_outside_the_grammar(bad, where):
    with pytest.raises(MigrationError) as err:
        encode_state(bad)
    assert where in str(err.value)


def test_encode_refuses_a_cycle():
    loop: list = []
    loop.append(loop)
    with pytest.raises(MigrationError, match="deeper"):
        encode_state(loop)


def test_version_mismatch_names_both_versions():
    blob = state_blob("test-codec-leaf", 3, {"value": b"\x00", "label": b"\x05\x00"})
    with pytest.raises(StateError) as err:
        decode_state(blob)
    assert str(err.value) == ("state 'test-codec-leaf' is version 3; this kvmpy reads version 1 "
                              "(snapshot from a newer kvmpy?)")
    with pytest.raises(StateError, match="version 2; this kvmpy reads version 3 .*older"):
        decode_state(state_blob("test-codec-pair", 2, {"left": b"\x00", "right": b"\x00"}))


@pytest.mark.parametrize("fields, message", [
    ({"value": b"\x00"}, "missing label"),
    ({"value": b"\x00", "label": b"\x05\x00", "colour": b"\x00"}, "unknown colour"),
    ({"label": b"\x05\x00", "extra": b"\x00"}, "missing value; unknown extra"),
])
def test_fields_must_match_the_class_exactly(fields, message):
    with pytest.raises(StateError) as err:
        decode_state(state_blob("test-codec-leaf", 1, fields))
    assert message in str(err.value)


def test_constructor_refusal_is_a_state_error():
    assert decode_state(state_blob("test-codec-checked", 1, {"count": b"\x03\x05"})) == Checked(5)
    with pytest.raises(StateError, match="ValueError: count must not be negative"):
        decode_state(state_blob("test-codec-checked", 1, {"count": b"\x04\x00"}))


@pytest.mark.parametrize("blob, message", [
    (b"", "truncated"),
    (b"\x0b", "unknown tag"),
    (b"\xff", "unknown tag"),
    (b"\x00\x00", "bytes after the value"),
    (b"\x03\x80\x00", "redundant"),
    (b"\x03" + b"\xff" * 10 + b"\x01", "longer than"),
    (b"\x03" + b"\x80" * 9 + b"\x02", "larger than 2**64"),
    (b"\x05\x02\xc3\x28", "UTF-8"),
    (b"\x06" + uvarint(2**62), "exceeds"),
    (b"\x07" + uvarint(2**40) + b"\x00", "exceeds"),
    (b"\x09\x01\x00\x00", "dict key with tag"),
    (b"\x09\x02\x03\x01\x00\x03\x01\x00", "twice"),
    (state_blob("test-no-such-state", 1, {}), "unknown state 'test-no-such-state'"),
    (state_blob("test-codec-leaf", 1, {"value": b"\x00"})[:-1], "truncated"),
    (bytes([codec.T_STATE]) + b"\x00", "name length 0"),
    (bytes([codec.T_STATE]) + name("x" * 200), "name length 200"),
    (state_blob("test-codec-pair", 3, {"left": b"\x00", "middle": b"\x00"}), "missing right; unknown middle"),
])
def test_malformed_blobs(blob, message):
    with pytest.raises((MigrationError, StateError)) as err:
        decode_state(blob)
    assert message in str(err.value)


def test_duplicate_field_refused():
    blob = bytes([codec.T_STATE]) + name("test-codec-pair") + uvarint(3) + uvarint(2) + \
        name("left") + b"\x00" + name("left") + b"\x00"
    with pytest.raises(MigrationError, match="field 'left' twice"):
        decode_state(blob)


def test_depth_limit():
    decode_state(b"\x07\x01" * MAX_DEPTH + b"\x00")
    with pytest.raises(MigrationError, match="nested deeper"):
        decode_state(b"\x07\x01" * (MAX_DEPTH + 1) + b"\x00")
    with pytest.raises(MigrationError, match="nested deeper"):
        decode_state(b"\x07\x01" * 100_000 + b"\x00")      # no RecursionError either


def test_value_count_limit(monkeypatch):
    monkeypatch.setattr(codec, "MAX_VALUES", 1000)
    decode_state(b"\x07" + uvarint(999) + b"\x00" * 999)
    with pytest.raises(MigrationError, match="more than 1000 values"):
        decode_state(b"\x07" + uvarint(1000) + b"\x00" * 1000)


def test_total_size_limit(monkeypatch):
    monkeypatch.setattr(codec, "MAX_STATE_BYTES", 100)
    with pytest.raises(MigrationError, match="limit"):
        decode_state(b"\x06" + uvarint(100) + b"x" * 100)
    with pytest.raises(MigrationError, match="limit"):
        encode_state(b"x" * 100)


@pytest.mark.parametrize("blob", [
    b"\x06" + uvarint(2**62) + b"x",
    b"\x05" + uvarint(2**63) + b"x",
    b"\x07" + uvarint(2**62) + b"\x00" * 64,
    b"\x09" + uvarint(2**62) + b"\x00" * 64,
    bytes([codec.T_STATE]) + name("test-codec-leaf") + b"\x01" + uvarint(2**62),
])
def test_huge_lengths_refused_before_allocating(blob):
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(MigrationError):
            decode_state(blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert time.monotonic() - started < 1.0


VALID_BLOBS = [encode_state(v) for v in EDGE_VALUES if v not in (None, True, False)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID_BLOBS), st.data())
def test_mutated_blobs_fail_cleanly(blob, data):
    mutation = data.draw(st.sampled_from(["truncate", "flip", "insert", "overwrite"]))
    mutated = bytearray(blob)
    if mutation == "truncate":
        mutated = mutated[:data.draw(st.integers(0, len(blob) - 1))]
    elif mutation == "flip":
        index = data.draw(st.integers(0, len(blob) - 1))
        mutated[index] ^= 1 << data.draw(st.integers(0, 7))
    elif mutation == "insert":
        index = data.draw(st.integers(0, len(blob)))
        mutated[index:index] = data.draw(st.binary(min_size=1, max_size=12))
    else:
        index = data.draw(st.integers(0, len(blob) - 1))
        patch = data.draw(st.binary(min_size=1, max_size=10))
        mutated[index:index + len(patch)] = patch
    try:
        decode_state(bytes(mutated))
    except (MigrationError, StateError):
        pass
    if mutation == "truncate":
        with pytest.raises(MigrationError):
            decode_state(bytes(mutated))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_fail_cleanly(blob):
    try:
        decode_state(blob)
    except (MigrationError, StateError):
        pass


def test_decode_refuses_non_bytes():
    with pytest.raises(MigrationError, match="expected bytes"):
        decode_state("text")  # type: ignore[arg-type]


def test_a_cut_field_name_is_truncation_not_a_shorter_field():
    """The decoder looks a field's name up among the class's names before the generic checks
    (speed at the switchover); a name cut short by the blob's end is still a clean refusal."""
    head = bytes([codec.T_STATE]) + name("test-codec-pair") + uvarint(3) + uvarint(2) + name("left") + b"\x00"
    for cut in range(1, len(b"right")):
        blob = head + uvarint(len(b"right")) + b"right"[:cut]
        with pytest.raises(MigrationError, match="exceeds|truncated"):
            decode_state(blob)
