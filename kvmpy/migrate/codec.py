"""State values to bytes and back, without pickle: the payload of a stream's config and state
sections.

A migration stream is untrusted input (a file anyone could have edited, a peer on the network),
so the decoder builds nothing but plain values and the dataclasses registered with
`kvmpy.state.versioned`, and checks every length against the bytes that are really there before
it allocates anything. Its failures are all `MigrationError` (a malformed blob) or `StateError`
(a state class at another version, or fields that do not match the class), never an IndexError,
a RecursionError or a MemoryError.

Format (one value, nothing after it; integers in a uvarint are LEB128: 7 bits a byte, low bits
first, at most 10 bytes, no redundant trailing 0x00 byte, so every value has exactly one encoding):

    value := 0x00                                  None
           | 0x01 | 0x02                           False | True
           | 0x03 uvarint(n)                       int n, 0 <= n < 2**64
           | 0x04 uvarint(-n - 1)                  int n, -2**64 <= n < 0
           | 0x05 uvarint(len) utf-8               str
           | 0x06 uvarint(len) bytes               bytes (bytearray/memoryview encode as bytes)
           | 0x07 uvarint(count) value*            list
           | 0x08 uvarint(count) value*            tuple
           | 0x09 uvarint(count) (key value)*      dict; a key is an int (0x03/0x04) or a str
                                                   (0x05) value; no key twice
           | 0x0A name uvarint(version) uvarint(count) (name value)*
                                                   a @versioned dataclass: its STATE_NAME and
                                                   STATE_VERSION, then its init fields by name
    name  := uvarint(len) utf-8                    len <= 128

Limits on decoding: the whole blob <= MAX_STATE_BYTES, nesting <= MAX_DEPTH, at most MAX_VALUES
values in all (a 64 MiB blob of one-byte Nones would otherwise become a 512 MiB list). Every
count is checked against the bytes left (each element takes at least one byte), every length
before the slice. The dataclass is built with `cls(**fields)` once its field names match its
init fields exactly; the values inside are not type-checked here: each part's `restore()`
validates its own state (the protocol in kvmpy/state.py).

Only classes already registered can be decoded: import the modules whose state a stream carries
(the machine does) before decoding. The encoder is here, the decoder in kvmpy.migrate.decoder
(decode_state); both read the tags and limits defined here.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from kvmpy.errors import MigrationError, StateError
from kvmpy.state import STATE_CLASSES

MAX_STATE_BYTES = 64 << 20      # a machine's whole state is a few MiB even with 256 vCPUs
MAX_DEPTH = 32                  # MachineState -> vcpus -> vcpu -> msrs -> ... is < 10 deep
MAX_VALUES = 1 << 20            # values in one blob (ints, strs, containers, ...)
MAX_NAME_BYTES = 128            # state class names and field names
INT_LIMIT = 1 << 64             # ints must satisfy -INT_LIMIT <= n < INT_LIMIT

T_NONE, T_FALSE, T_TRUE, T_UINT, T_NEGINT, T_STR, T_BYTES, T_LIST, T_TUPLE, T_DICT, T_STATE = range(11)
_KEY_TAGS = (T_UINT, T_NEGINT, T_STR)
_VARINT_MAX_BYTES = 10          # ceil(64 / 7)


class _EncodeFailure(Exception):
    """Internal: carries the path to a bad value up the recursion (turned into MigrationError)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


def _put_uvarint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _put_name(out: bytearray, name: str) -> None:
    raw = name.encode("utf-8")
    if not raw or len(raw) > MAX_NAME_BYTES:
        raise _EncodeFailure(f"name {name!r} is empty or longer than {MAX_NAME_BYTES} bytes")
    _put_uvarint(out, len(raw))
    out += raw


def _encode_int(out: bytearray, value: int) -> None:
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise _EncodeFailure(f"int {value:#x} is outside [-2**64, 2**64)")
    if value >= 0:
        out.append(T_UINT)
        _put_uvarint(out, value)
    else:
        out.append(T_NEGINT)
        _put_uvarint(out, -value - 1)


def _encode_str(out: bytearray, value: str) -> None:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _EncodeFailure(f"str is not valid UTF-8 text ({exc.reason})") from None
    out.append(T_STR)
    _put_uvarint(out, len(raw))
    out += raw


# per state class: its header (tag, name, version, field count) and (field, encoded name) pairs,
# built once: the switchover encodes ~200 values, and under nested TCG every Python step counts
_LAYOUTS: dict[type, tuple[bytes, tuple[tuple[str, bytes], ...]]] = {}


def _layout(cls: type) -> tuple[bytes, tuple[tuple[str, bytes], ...]]:
    layout = _LAYOUTS.get(cls)
    if layout is not None and STATE_CLASSES.get(cls.STATE_NAME) is cls:   # still the registered one
        return layout
    name = getattr(cls, "STATE_NAME", None)
    if name is None or STATE_CLASSES.get(name) is not cls:
        raise _EncodeFailure(f"dataclass {cls.__qualname__} is not registered with @versioned")
    header = bytearray([T_STATE])
    _put_name(header, name)
    _put_uvarint(header, cls.STATE_VERSION)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    _put_uvarint(header, len(fields))
    named = []
    for field in fields:
        raw = bytearray()
        _put_name(raw, field)
        named.append((field, bytes(raw)))
    layout = _LAYOUTS[cls] = (bytes(header), tuple(named))
    return layout


def prepare_classes() -> None:
    """Build every registered state class's encoding layout now, at a migration's setup, so the
    switchover's encode does not build them in the downtime (kvmpy.migrate.decoder has the
    same for the destination's side)."""
    for cls in list(STATE_CLASSES.values()):
        try:
            _layout(cls)
        except _EncodeFailure:
            continue


def _encode_state(out: bytearray, obj: Any, depth: int) -> None:
    header, fields = _layout(type(obj))
    out += header
    for field, encoded_name in fields:
        out += encoded_name
        try:
            _encode(out, getattr(obj, field), depth + 1)
        except _EncodeFailure as failure:
            failure.path.append(f".{field}")
            raise


def _encode(out: bytearray, obj: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise _EncodeFailure(f"nested deeper than {MAX_DEPTH} levels (a cycle?)")
    kind = type(obj)
    if kind is int:             # the common case first: registers, MSRs, counters
        if 0 <= obj < 0x80:
            out.append(T_UINT)
            out.append(obj)
        else:
            _encode_int(out, obj)
    elif kind is bytes:
        out.append(T_BYTES)
        _put_uvarint(out, len(obj))
        out += obj
    elif obj is None:
        out.append(T_NONE)
    elif obj is True:
        out.append(T_TRUE)
    elif obj is False:
        out.append(T_FALSE)
    elif isinstance(obj, enum.Enum):
        # checked before int: an IntEnum is an int, but decoding would give back a plain int
        raise _EncodeFailure(f"enum {type(obj).__qualname__}.{obj.name} is not a state value "
                             "(store its .value)")
    elif kind is str:
        _encode_str(out, obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        try:
            raw = obj.tobytes() if isinstance(obj, memoryview) else bytes(obj)
        except (TypeError, ValueError) as exc:
            raise _EncodeFailure(f"memoryview cannot be read as bytes ({exc})") from None
        out.append(T_BYTES)
        _put_uvarint(out, len(raw))
        out += raw
    elif kind is list or kind is tuple:
        out.append(T_LIST if kind is list else T_TUPLE)
        _put_uvarint(out, len(obj))
        for index, item in enumerate(obj):
            try:
                _encode(out, item, depth + 1)
            except _EncodeFailure as failure:
                failure.path.append(f"[{index}]")
                raise
    elif kind is dict:
        out.append(T_DICT)
        _put_uvarint(out, len(obj))
        for key, item in obj.items():
            if type(key) is int:
                _encode_int(out, key)
            elif type(key) is str:
                _encode_str(out, key)
            else:
                raise _EncodeFailure(f"dict key {key!r} is a {type(key).__name__}, not int or str")
            try:
                _encode(out, item, depth + 1)
            except _EncodeFailure as failure:
                failure.path.append(f"[{key!r}]")
                raise
    elif kind in _LAYOUTS or dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        _encode_state(out, obj, depth)
    else:
        raise _EncodeFailure(f"{type(obj).__qualname__} is not a state value "
                             "(None, bool, int, str, bytes, list, tuple, dict, @versioned dataclass)")


def encode_state(obj: object) -> bytes:
    """Encode a state value (see the module docstring for what is one). A value outside the
    grammar raises MigrationError naming where it is, e.g. "state.vcpus[1].msrs: float ...":
    that is a bug in the part whose state() returned it, caught at save time, not at restore."""
    out = bytearray()
    try:
        _encode(out, obj, 0)
    except _EncodeFailure as failure:
        where = "state" + "".join(reversed(failure.path))
        raise MigrationError("encoding state", detail=f"{where}: {failure.message}") from None
    if len(out) > MAX_STATE_BYTES:
        raise MigrationError("encoding state",
                             detail=f"{len(out)} bytes is more than the {MAX_STATE_BYTES}-byte limit")
    return bytes(out)
