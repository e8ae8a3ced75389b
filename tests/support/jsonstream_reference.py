"""The JSON stream scanner as it was before it found whole values with one regular expression
(kvmpy/monitor/jsonstream.py): a state machine that stops at every structural byte. Kept here,
unchanged, as the reference the differential test (tests/tier0/test_jsonstream_differential.py)
drives beside the package's scanner: the same bytes split at the same points must give the same
values and the same errors. Not part of the package: nothing but that test imports it.

Its original description:
Split a QMP client's byte stream into JSON values, the way QEMU's JSON streamer does.

QMP is not line-based: QEMU counts braces and brackets (outside strings) and parses a value as
soon as its outermost bracket closes, so `{"execute":"a"}{"execute":"b"}` is two commands and a
command may span lines. A client is untrusted input, so this also bounds what one value may cost
(size, nesting) and recovers from garbage without ever raising: every problem becomes one
("error", desc) item with QEMU's wording, and the stream goes on.

Recovery (QEMU's json-lexer does the same): after an error, input is skipped up to the next
newline or structural character ({ [ ] }); `{` or `[` starts the next value. A client can force
a known-good state by sending a control character such as 0x04 followed by a newline.

Scanning uses regular expressions over bytes so that a 16 MiB line costs C speed, not a Python
loop per byte.
"""
from __future__ import annotations

import json
import re
from typing import Any

Item = tuple[str, Any]      # ("message", value) or ("error", description)

DEFAULT_MAX_MESSAGE = 1 << 20      # bytes in one JSON value (QEMU allows 64 MiB; we need far less)
DEFAULT_MAX_DEPTH = 1024           # QEMU's MAX_NESTING

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_IN_STRING_STOP = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
_IN_VALUE_STOP = re.compile(rb'[\[\]{}"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff]')
_SCALAR_STOP = re.compile(rb'[ \t\r\n\[\]{}"\x00-\x1f\xfe\xff]')
_RECOVERY_STOP = re.compile(rb"[\[\]{}\n]")


def _stray(byte: int) -> str:
    return f"JSON parse error, stray '{chr(byte)!r}'" if byte < 0x80 else \
        f"JSON parse error, stray '\\x{byte:02x}'"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid keyword '{name}'")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key '{key}'")
            seen.add(key)
    return value


def decode_value(raw: bytes) -> Item:
    """One complete JSON text -> ("message", value) or ("error", QEMU-style description).

    QEMU rejects invalid UTF-8, NaN/Infinity and duplicate keys; so does this."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return ("error", "JSON parse error, invalid UTF-8 sequence in string")
    try:
        return ("message", json.loads(text, parse_constant=_reject_constant,
                                      object_pairs_hook=_no_duplicates))
    except RecursionError:
        return ("error", "JSON nesting depth limit exceeded")
    except json.JSONDecodeError as e:
        return ("error", f"JSON parse error, {e.msg[0].lower()}{e.msg[1:]}")
    except ValueError as e:
        return ("error", f"JSON parse error, {e}")


class JsonStreamer:
    """Feed bytes, get complete values and errors in the order the client sent them."""

    def __init__(self, max_message_bytes: int = DEFAULT_MAX_MESSAGE,
                 max_depth: int = DEFAULT_MAX_DEPTH):
        self.max_message_bytes = max_message_bytes
        self.max_depth = max_depth
        self._buf = bytearray()
        self._depth = 0            # open { and [ outside strings
        self._in_string = False
        self._escape = False       # the previous byte in a string was a backslash
        self._scalar = False       # a top-level bare token (42, true, garbage) in progress
        self._recovering = False

    def _reset(self) -> None:
        self._buf.clear()
        self._depth = 0
        self._in_string = self._escape = self._scalar = False

    def _fail(self, out: list[Item], desc: str) -> None:
        out.append(("error", desc))
        self._reset()
        self._recovering = True

    def _append(self, out: list[Item], chunk: bytes) -> bool:
        """Add to the value in progress; False (after reporting) when it grew too big."""
        self._buf += chunk
        if len(self._buf) > self.max_message_bytes:
            self._fail(out, "JSON token size limit exceeded")
            return False
        return True

    def _emit(self, out: list[Item]) -> None:
        raw = bytes(self._buf)
        self._reset()
        out.append(decode_value(raw))

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        pos, end = 0, len(data)
        while pos < end:
            if self._recovering:
                m = _RECOVERY_STOP.search(data, pos)
                if m is None:
                    return out
                byte = data[m.start()]
                self._recovering = False
                pos = m.start() if byte in b"{[" else m.end()
            elif self._escape:
                self._escape = False
                if not self._append(out, data[pos:pos + 1]):
                    continue
                pos += 1
            elif self._in_string:
                m = _IN_STRING_STOP.search(data, pos)
                stop = m.start() if m else end
                if not self._append(out, data[pos:stop]):
                    pos = stop
                    continue
                pos = stop
                if m is None:
                    return out
                byte = data[stop]
                if byte == 0x22:                      # closing quote
                    self._append(out, b'"')
                    self._in_string = False
                    pos += 1
                    if self._depth == 0:
                        self._emit(out)
                elif byte == 0x5C:                    # backslash: the next byte is escaped
                    self._append(out, b"\\")
                    self._escape = True
                    pos += 1
                else:
                    self._fail(out, _stray(byte))
                    pos += 1
            elif self._scalar:
                m = _SCALAR_STOP.search(data, pos)
                stop = m.start() if m else end
                if not self._append(out, data[pos:stop]):
                    pos = stop
                    continue
                pos = stop
                if m is None:
                    return out
                self._emit(out)                       # the delimiter is handled at depth 0
            elif self._depth == 0:
                pos = _WHITESPACE.match(data, pos).end()
                if pos >= end:
                    return out
                byte = data[pos]
                if byte in b"{[":
                    self._depth = 1
                    self._append(out, data[pos:pos + 1])
                elif byte == 0x22:
                    self._in_string = True
                    self._append(out, b'"')
                elif byte in b"}]":
                    out.append(("error", "JSON parse error, expecting value"))
                elif byte < 0x20 or byte >= 0xFE:
                    self._fail(out, _stray(byte))
                else:
                    self._scalar = True
                    continue                          # the scalar branch consumes it
                pos += 1
            else:
                m = _IN_VALUE_STOP.search(data, pos)
                stop = m.start() if m else end
                if not self._append(out, data[pos:stop]):
                    pos = stop
                    continue
                pos = stop
                if m is None:
                    return out
                byte = data[stop]
                pos += 1
                if byte in b"{[":
                    self._depth += 1
                    if self._depth > self.max_depth:
                        self._fail(out, "JSON nesting depth limit exceeded")
                        continue
                    self._append(out, data[stop:stop + 1])
                elif byte in b"}]":
                    self._depth -= 1
                    if self._append(out, data[stop:stop + 1]) and self._depth == 0:
                        self._emit(out)
                elif byte == 0x22:
                    self._in_string = True
                    self._append(out, b'"')
                else:
                    self._fail(out, _stray(byte))
        return out

