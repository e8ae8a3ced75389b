"""The state codec's decoder (the format and the encoder: kvmpy.migrate.codec): untrusted bytes to
plain values and registered state dataclasses, every length checked before it is used.

Speed matters here as much as care: the destination decodes the machine's state inside the
migration's downtime, under nested TCG at ~60x this host's cost per Python step. So the common
values (small ints, None, bools, an MSR table's int -> int entries, a class's own field names)
are read inline, and everything else, including every malformed case, takes the checked path.
The limits are read from kvmpy.migrate.codec at call time, so one place defines them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from kvmpy.errors import MigrationError, StateError
from kvmpy.migrate import codec
from kvmpy.migrate.codec import (_KEY_TAGS, _VARINT_MAX_BYTES, INT_LIMIT, MAX_DEPTH, MAX_NAME_BYTES,
                                 T_BYTES, T_DICT, T_FALSE, T_LIST, T_NEGINT, T_NONE, T_STATE, T_STR,
                                 T_TRUE, T_TUPLE, T_UINT)
from kvmpy.state import STATE_CLASSES


_FIELD_NAMES: dict[type, frozenset[str]] = {}     # per state class, its init fields' names
_FIELD_BYTES: dict[type, dict[bytes, str]] = {}   # and the same names as the stream spells them
_SINGLETONS = (None, False, True)                 # T_NONE, T_FALSE, T_TRUE


class _Decoder:
    """One pass over an untrusted blob; every read is bounds-checked first."""

    __slots__ = ("data", "pos", "values", "max_values")

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        self.values = 0
        self.max_values = codec.MAX_VALUES

    def fail(self, detail: str) -> MigrationError:
        return MigrationError("decoding state", detail=f"at byte {self.pos}: {detail}")

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise self.fail("truncated")
        value = self.data[self.pos]
        self.pos += 1
        return value

    def uvarint(self) -> int:
        data, pos = self.data, self.pos      # locals: an MSR table is ~100 of these per vCPU
        end = len(data)
        if pos >= end:
            raise self.fail("truncated")
        byte = data[pos]
        pos += 1
        if byte < 0x80:
            self.pos = pos
            return byte
        result, shift = byte & 0x7F, 7
        for _ in range(_VARINT_MAX_BYTES - 1):
            if pos >= end:
                self.pos = pos
                raise self.fail("truncated")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                self.pos = pos
                if byte == 0:
                    raise self.fail("integer with a redundant trailing byte")
                if result >= INT_LIMIT:
                    raise self.fail("integer larger than 2**64")
                return result
            shift += 7
        self.pos = pos
        raise self.fail(f"integer longer than {_VARINT_MAX_BYTES} bytes")

    def count(self, min_bytes_each: int) -> int:
        """An element count, refused unless the remaining bytes could hold that many elements."""
        at = self.pos
        n = self.uvarint()
        if n * min_bytes_each > len(self.data) - self.pos:
            self.pos = at
            raise self.fail(f"count {n} exceeds the {len(self.data) - self.pos} bytes left")
        return n

    def raw(self, length: int) -> bytes:
        if length > len(self.data) - self.pos:
            raise self.fail(f"length {length} exceeds the {len(self.data) - self.pos} bytes left")
        chunk = self.data[self.pos:self.pos + length]
        self.pos += length
        return chunk

    def text(self, length: int) -> str:
        at = self.pos
        raw = self.raw(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.pos = at
            raise self.fail("string is not valid UTF-8") from None

    def name(self) -> str:
        at = self.pos
        length = self.uvarint()
        if not 1 <= length <= MAX_NAME_BYTES:
            self.pos = at
            raise self.fail(f"name length {length} not in 1..{MAX_NAME_BYTES}")
        return self.text(length)

    def value(self, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH} levels")
        self.values += 1
        if self.values > self.max_values:
            raise self.fail(f"more than {self.max_values} values")
        data, at = self.data, self.pos
        if at + 1 < len(data):  # inline: a small int, None or a bool (most of a machine's values)
            tag = data[at]
            if tag == T_UINT and data[at + 1] < 0x80:
                self.pos = at + 2
                return data[at + 1]
            if tag <= T_TRUE:
                self.pos = at + 1
                return _SINGLETONS[tag]
        tag = self.byte()
        if tag == T_UINT:       # the common case first: registers, MSRs, counters
            return self.uvarint()
        if tag == T_BYTES:
            return self.raw(self.uvarint())
        if tag == T_NONE:
            return None
        if tag == T_FALSE:
            return False
        if tag == T_TRUE:
            return True
        if tag == T_NEGINT:
            return -self.uvarint() - 1
        if tag == T_STR:
            return self.text(self.uvarint())
        if tag == T_LIST or tag == T_TUPLE:
            items = [self.value(depth + 1) for _ in range(self.count(1))]
            return items if tag == T_LIST else tuple(items)
        if tag == T_DICT:
            return self.mapping(depth)
        if tag == T_STATE:
            return self.state(depth)
        self.pos = at
        raise self.fail(f"unknown tag {tag:#04x}")

    def mapping(self, depth: int) -> dict[int | str, Any]:
        result: dict[int | str, Any] = {}
        data = self.data
        for _ in range(self.count(2)):
            at = self.pos
            # an int -> int entry (an MSR table: most of a vCPU's values) without value()'s
            # dispatch, within the limits value() checks; anything else takes the general path
            if at + 1 < len(data) and data[at] == T_UINT and depth + 1 <= MAX_DEPTH \
                    and self.values + 2 <= self.max_values:
                self.pos = at + 1
                key = self.uvarint()
                if key not in result and self.pos < len(data) and data[self.pos] == T_UINT:
                    self.pos += 1
                    self.values += 2
                    result[key] = self.uvarint()
                    continue
                self.pos = at
            tag = self.byte()
            if tag not in _KEY_TAGS:
                self.pos = at
                raise self.fail(f"dict key with tag {tag:#04x} (keys are int or str)")
            self.pos = at
            key = self.value(depth + 1)
            if key in result:
                self.pos = at
                raise self.fail(f"dict key {key!r} twice")
            result[key] = self.value(depth + 1)
        return result

    def state(self, depth: int) -> Any:
        at = self.pos
        name = self.name()
        cls = STATE_CLASSES.get(name)
        if cls is None:
            self.pos = at
            raise self.fail(f"unknown state {name!r} (snapshot from a newer kvmpy?)")
        version = self.uvarint()
        if version != cls.STATE_VERSION:
            hint = "a newer" if version > cls.STATE_VERSION else "an older"
            raise StateError(f"state {name!r} is version {version}; this kvmpy reads version "
                             f"{cls.STATE_VERSION} (snapshot from {hint} kvmpy?)")
        expected = _FIELD_NAMES.get(cls)
        if expected is None:
            expected = _FIELD_NAMES[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.init)
        known = _FIELD_BYTES.get(cls)
        if known is None:
            known = _FIELD_BYTES[cls] = {f.encode("utf-8"): f for f in expected}
        data = self.data
        fields: dict[str, Any] = {}
        for _ in range(self.count(3)):
            field_at = self.pos
            length = data[field_at] if field_at < len(data) else 0
            end = field_at + 1 + length
            field = known.get(data[field_at + 1:end]) if 0 < length < 0x80 and end <= len(data) else None
            if field is not None:           # one of the class's names (one length byte): no checks left
                self.pos = end
            else:
                field = self.name()
            if field in fields:
                self.pos = field_at
                raise self.fail(f"state {name!r}: field {field!r} twice")
            fields[field] = self.value(depth + 1)
        missing = sorted(expected - fields.keys())
        extra = sorted(fields.keys() - expected)
        if missing or extra:
            parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                    ([f"unknown {', '.join(extra)}"] if extra else [])
            raise StateError(f"state {name!r} v{version} does not match this kvmpy's fields",
                             detail="; ".join(parts))
        try:
            return cls(**fields)
        except StateError:
            raise
        except Exception as exc:  # a __post_init__ refusing the values: untrusted input, one line
            raise StateError(f"state {name!r} v{version}", detail=f"{type(exc).__name__}: {exc}") from None


def decode_state(data: bytes | bytearray | memoryview) -> object:
    """Decode one state value from untrusted bytes (the whole blob, nothing after it). Raises
    MigrationError for a malformed blob and StateError for a state class this kvmpy reads at
    another version or with other fields."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MigrationError("decoding state", detail=f"expected bytes, got {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > codec.MAX_STATE_BYTES:
        raise MigrationError("decoding state",
                             detail=f"{size} bytes is more than the {codec.MAX_STATE_BYTES}-byte limit")
    decoder = _Decoder(data.tobytes() if isinstance(data, memoryview) else bytes(data))
    value = decoder.value(0)
    if decoder.pos != len(decoder.data):
        raise decoder.fail(f"{len(decoder.data) - decoder.pos} bytes after the value")
    return value


def prepare_classes() -> None:
    """Every registered state class's field tables now (the destination calls it at setup), so
    the switchover's decode does not build them in the downtime."""
    for cls in list(STATE_CLASSES.values()):
        if dataclasses.is_dataclass(cls):
            names = _FIELD_NAMES.setdefault(cls, frozenset(f.name for f in dataclasses.fields(cls) if f.init))
            _FIELD_BYTES.setdefault(cls, {f.encode("utf-8"): f for f in names})
