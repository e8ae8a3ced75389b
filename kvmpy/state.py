"""The one state protocol every device, vCPU and the VM follow, and the registry the stream codec
reads.

A stateful part of the machine exposes two methods, spelled the same everywhere:

    state()          -> a dataclass decorated with @versioned("name", N): the live state, plain
                        data (int, bool, str, bytes, None, lists/tuples/dicts of these, and
                        nested versioned dataclasses)
    restore(state)   -> validates *everything* first (the state may come from an untrusted
                        migration stream), raises StateError naming the field, and only then
                        touches the device

`@versioned` gives each state class a stable name and a version and registers it, so a stream can
name what it carries without pickle: the decoder only ever builds classes found here, and refuses
a version it does not know ("snapshot from a newer kvmpy") before anything is restored.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, TypeVar, runtime_checkable

from kvmpy.errors import StateError

T = TypeVar("T")

# name -> state dataclass; filled at import time by @versioned
STATE_CLASSES: dict[str, type] = {}


def versioned(name: str, version: int = 1) -> Callable[[type[T]], type[T]]:
    """Register a state dataclass under `name` at `version` (class attributes STATE_NAME and
    STATE_VERSION). Bump the version whenever a field is added, removed or changes meaning."""
    def wrap(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"@versioned({name!r}) needs a dataclass, got {cls.__name__}")
        other = STATE_CLASSES.get(name)
        if other is not None and other.__qualname__ != cls.__qualname__:
            raise TypeError(f"state name {name!r} is taken by {other.__qualname__}")
        cls.STATE_NAME = name          # type: ignore[attr-defined]
        cls.STATE_VERSION = version    # type: ignore[attr-defined]
        STATE_CLASSES[name] = cls
        return cls
    return wrap


@runtime_checkable
class Stateful(Protocol):
    """What the machine's device table, snapshots and migration need of a part."""

    def state(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


def expect_state(state: object, cls: type[T], what: str) -> T:
    """The first check of every restore(): the right class (a stream could carry another)."""
    if not isinstance(state, cls):
        raise StateError(f"restoring {what}", detail=f"expected {cls.__name__}, got {type(state).__name__}")
    return state


def check_int(what: str, name: str, value: object, bits: int | None = None,
              lo: int = 0, hi: int | None = None) -> int:
    """Raise StateError unless `value` is an int (not a bool) within [lo, 2**bits) or [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"restoring {what}", detail=f"{name}={value!r} is not an integer")
    top = hi if hi is not None else ((1 << bits) - 1 if bits is not None else None)
    if value < lo or (top is not None and value > top):
        raise StateError(f"restoring {what}", detail=f"{name}={value:#x} out of range")
    return value


def check_bytes(what: str, name: str, value: object, size: int | None = None,
                max_size: int | None = None) -> bytes:
    """Raise StateError unless `value` is bytes of exactly `size` (or at most `max_size`) bytes."""
    if not isinstance(value, (bytes, bytearray)):
        raise StateError(f"restoring {what}", detail=f"{name} is {type(value).__name__}, not bytes")
    if size is not None and len(value) != size:
        raise StateError(f"restoring {what}", detail=f"{name}: expected {size} bytes, got {len(value)}")
    if max_size is not None and len(value) > max_size:
        raise StateError(f"restoring {what}", detail=f"{name}: {len(value)} bytes > {max_size}")
    return bytes(value)
