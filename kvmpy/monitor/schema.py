"""QMP argument schemas and their checking, with QEMU's error wording.

Every command declares its arguments; `check_arguments` runs before the command, so a command
body only ever sees arguments of the declared types. Like QEMU's QObject input visitor it reports
the first member (in schema order) that is missing or of the wrong type, then members the schema
does not know, and names nested members the way QEMU does (`capabilities[0].state`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


class QmpError(Exception):
    """A command failed: becomes {"error": {"class": error_class, "desc": desc}}."""

    def __init__(self, desc: str, error_class: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class

    def to_json(self) -> dict:
        return {"class": self.error_class, "desc": self.desc}


@dataclass(frozen=True)
class Enum:
    values: tuple[str, ...]


@dataclass(frozen=True)
class ListOf:
    element: "ArgType"


@dataclass(frozen=True)
class Struct:
    members: dict[str, "Arg"] = field(default_factory=dict)


# "str", "int" (int64), "uint" (uint64), "number", "bool", "any", or a compound
ArgType = Union[str, Enum, ListOf, Struct]


@dataclass(frozen=True)
class Arg:
    type: ArgType
    optional: bool = False


_TYPE_WORDS = {"str": "string", "int": "integer", "uint": "integer", "number": "number",
               "bool": "boolean"}


def _type_word(arg_type: ArgType) -> str:
    if isinstance(arg_type, str):
        return _TYPE_WORDS.get(arg_type, "value")
    if isinstance(arg_type, Enum):
        return "string"
    if isinstance(arg_type, ListOf):
        return "array"
    return "object"


def _wrong_type(name: str, arg_type: ArgType) -> QmpError:
    return QmpError(f"Invalid parameter type for '{name}', expected: {_type_word(arg_type)}")


def check_value(name: str, arg_type: ArgType, value: Any) -> None:
    """Raise QmpError unless `value` has `arg_type`. bool is never an integer (JSON keeps them
    apart; Python does not)."""
    if arg_type == "any":
        return
    if arg_type == "str":
        if not isinstance(value, str):
            raise _wrong_type(name, arg_type)
    elif arg_type in ("int", "uint"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong_type(name, arg_type)
        lo, hi = (INT64_MIN, INT64_MAX) if arg_type == "int" else (0, UINT64_MAX)
        if not lo <= value <= hi:
            raise QmpError(f"Parameter '{name}' expects {'int64' if arg_type == 'int' else 'uint64'}")
    elif arg_type == "number":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong_type(name, arg_type)
    elif arg_type == "bool":
        if not isinstance(value, bool):
            raise _wrong_type(name, arg_type)
    elif isinstance(arg_type, Enum):
        if not isinstance(value, str):
            raise _wrong_type(name, arg_type)
        if value not in arg_type.values:
            raise QmpError(f"Parameter '{name}' does not accept value '{value}'")
    elif isinstance(arg_type, ListOf):
        if not isinstance(value, list):
            raise _wrong_type(name, arg_type)
        for index, element in enumerate(value):
            check_value(f"{name}[{index}]", arg_type.element, element)
    elif isinstance(arg_type, Struct):
        if not isinstance(value, dict):
            raise _wrong_type(name, arg_type)
        check_members(arg_type.members, value, prefix=f"{name}.")
    else:  # a schema bug, not a client's
        raise TypeError(f"unknown schema type {arg_type!r}")


def check_members(members: dict[str, Arg], value: dict, prefix: str = "") -> None:
    for member, arg in members.items():
        if member not in value:
            if not arg.optional:
                raise QmpError(f"Parameter '{prefix}{member}' is missing")
            continue
        check_value(f"{prefix}{member}", arg.type, value[member])
    for member in value:
        if member not in members:
            raise QmpError(f"Parameter '{prefix}{member}' is unexpected")


def check_arguments(members: dict[str, Arg], arguments: dict) -> None:
    """Check a command's `arguments` object against its schema (top-level names unprefixed)."""
    check_members(members, arguments)


def describe(arg_type: ArgType) -> Any:
    """A compact, JSON-able description of a type (for `query-commands`-style listings)."""
    if isinstance(arg_type, str):
        return arg_type
    if isinstance(arg_type, Enum):
        return {"enum": list(arg_type.values)}
    if isinstance(arg_type, ListOf):
        return [describe(arg_type.element)]
    return {name: describe(arg.type) for name, arg in arg_type.members.items()}
