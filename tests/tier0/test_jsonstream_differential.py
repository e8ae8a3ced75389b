"""The QMP JSON stream scanner (kvmpy/monitor/jsonstream.py) against the state machine it replaced
(tests/support/jsonstream_reference.py): the same bytes split at the same points, under the same
limits, must give the same values, the same errors in the same order, and leave the same state
(buffered bytes, depth, string/escape/scalar/recovery flags) after every read. The scanner takes
whole values and runs in bulk only where stepping could not have failed; these streams aim at
every place where that could go wrong: stray bytes in and out of strings, escapes split across
reads, nesting at and past the limit, values at and past the size limit, garbage and recovery."""
from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st
from hypothesis_budget import examples

from kvmpy.monitor import jsonstream
from kvmpy.monitor.jsonstream import JsonStreamer
from support import jsonstream_reference
from support.jsonstream_reference import JsonStreamer as ReferenceStreamer

# Pieces a stream is built from: structure, strings with escapes, bytes that are stray in or out of
# strings, invalid UTF-8, keywords QEMU rejects, whole commands, and arbitrary bytes
FRAGMENTS = [b"{", b"}", b"[", b"]", b'"', b"\\", b'\\"', b"\\\\", b":", b",", b" ", b"\n", b"\r\n", b"\t",
             b"0", b"-1.5e3", b"42", b"true", b"null", b"NaN", b"Infinity", b"x", b'"a"', b'"\\u00e9"',
             b'"\\ud800"', b"\x00", b"\x04", b"\x08", b"\x1f", b"\x7f", b"\xfe", b"\xff", b"\xc3\x28", b"\xc3\xa9",
             b'{"execute":"qmp_capabilities"}', b'{"execute":"query-status","id":[1,{"a":"}"}]}',
             b'{"a":1,"a":2}', b"[[[[[[[[[[]]]]]]]]]]", b"{]", b"[}"]

fragment_streams = st.lists(st.sampled_from(FRAGMENTS) | st.binary(max_size=6), max_size=60).map(b"".join)
json_streams = st.lists(
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=6),
                 lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                 max_leaves=12).map(lambda v: json.dumps(v).encode() + b"\n"),
    max_size=6).map(b"".join)
streams = fragment_streams | json_streams | st.binary(max_size=400)
limits = st.fixed_dictionaries({"max_message_bytes": st.sampled_from([0, 1, 2, 5, 16, 40, 100, 1 << 20]),
                                "max_depth": st.sampled_from([0, 1, 2, 3, 7, 8, 9, 12, 1024])})


def state(streamer) -> tuple:
    return (bytes(streamer._buf), streamer._depth, streamer._in_string, streamer._escape,
            streamer._scalar, streamer._recovering)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def assert_same(chunks: list[bytes], kw: dict) -> None:
    new, old = JsonStreamer(**kw), ReferenceStreamer(**kw)
    for i, chunk in enumerate(chunks):
        assert new.feed(chunk) == old.feed(chunk), f"read {i} ({chunk!r}) of {chunks!r} under {kw}"
        assert state(new) == state(old), f"state after read {i} of {chunks!r} under {kw}"


@given(streams, st.lists(st.integers(0, 1 << 16), max_size=12), limits)
@settings(max_examples=examples(3000), deadline=None)
def test_scanner_matches_the_reference_state_machine(data, cuts, kw):
    assert_same(split(data, cuts), kw)


@given(streams, limits)
@settings(max_examples=examples(500), deadline=None)
def test_scanner_matches_the_reference_byte_by_byte(data, kw):
    assert_same([data[i:i + 1] for i in range(len(data))], kw)


def test_known_edges_match_the_reference():
    """Hand-picked streams at the limits, each fed whole and byte by byte (the random ones may
    not hit every edge in a given run)."""
    cases = [
        (b'{"a":"bc"}', {"max_message_bytes": 10}), (b'{"a":"bc"}', {"max_message_bytes": 9}),
        (b'{"a":"{[bc"}{"b":1}', {"max_message_bytes": 9}), (b'["\\', {}), (b'["\\\x00"]', {}),
        (b"[[[]]]", {"max_depth": 2}), (b"[[[]]]", {"max_depth": 3}), (b"[]", {"max_depth": 0}),
        (b"[" * 9 + b"]" * 9, {"max_depth": 9}), (b"[" * 10 + b"]" * 10 + b"{}", {"max_depth": 9}),
        (b'{"a":"\x01"}\n{}', {}), (b'{"a":"\xfe"}{}', {}), (b'{"a":\x7f}', {}), (b'{"a" \x0b}[1]', {}),
        # the escape flag a size error leaves set swallows the first byte after recovery into a
        # fresh value (the reference's behaviour, kept): the whole-value step must not skip it
        (b'" \\[[]', {"max_message_bytes": 2, "max_depth": 1}),
        (b'"top"  7 {"x":[1,2]}]', {}), (b'{"a":"' + b"x" * 100 + b'"}{"b":2}', {"max_message_bytes": 50}),
    ]
    for data, kw in cases:
        assert_same([data], kw)
        assert_same([data[i:i + 1] for i in range(len(data))], kw)


def test_whole_value_pattern_counts_brackets_and_depth():
    """The bulk step's pattern: a value ends at the bracket that closes its first one, strings
    hide brackets, and a value deeper than the pattern's depth does not match (so the state
    machine reports the depth error)."""
    two = jsonstream._whole_value(2)
    assert two.match(b'{"a":[1,"]"]} tail').end() == len(b'{"a":[1,"]"]}')
    assert two.match(b"{]").end() == 2
    assert two.match(b"[[[]]]") is None and jsonstream._whole_value(3).match(b"[[[]]]").end() == 6
    assert two.match(b'{"a":"\x01"}') is None and two.match(b'{"a":1') is None
    assert jsonstream_reference.JsonStreamer is not JsonStreamer      # the reference is the old code, not an alias
