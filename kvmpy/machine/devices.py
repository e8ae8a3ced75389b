"""The device table: every device of one machine under a stable id, with its kind and bus ranges,
and the one place the machine's state walks to capture or restore its devices.

Ids are stable across runs of the same configuration (they are what a snapshot names, and what
the destination of a migration matches), so they derive from the configuration only: "com1",
"i8042", "rtc", "pci", "acpi-pm", "virtio-disk0", "virtio-rng0", ... Kinds use QEMU's device
names where QEMU has one ("isa-serial", "mc146818rtc", "virtio-blk-pci"), so `machine.devices`
reads like QEMU's `info qtree` to a QEMU user.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from kvmpy.errors import ConfigError, StateError


# Kinds a migration destination need not match: the API's Python hooks belong to one process.
LOCAL_KINDS = frozenset({"python-hook"})


@dataclass(frozen=True)
class BusRange:
    bus: str            # "pio", "mmio" or "pci" (a bus/slot address as base, length 1)
    base: int
    length: int

    def __str__(self) -> str:
        if self.bus == "pci":
            return f"pci 00:{self.base:02x}.0"
        return f"{self.bus} {self.base:#x}-{self.base + self.length - 1:#x}"


@dataclass
class DeviceEntry:
    """One row of the table. `device` is the object with state()/restore(), or None for a
    stateless device (a probe sink); `config` is what the destination of a migration must match."""
    id: str
    kind: str
    device: Any
    ranges: list[BusRange] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def stateful(self) -> bool:
        """Follows the state protocol (kvmpy.state.Stateful). Checked by attribute, not with the
        runtime Protocol's isinstance: that walks the Protocol's members on every call, half of
        a switchover's device capture under nested TCG."""
        device = self.device
        return callable(getattr(device, "state", None)) and callable(getattr(device, "restore", None))

    def describe(self) -> str:
        where = ", ".join(str(r) for r in self.ranges) or "-"
        return f"{self.id:<16} {self.kind:<20} {where}"


class DeviceTable:
    """Ordered: devices are restored in the order they were added (PCI root before its functions)."""

    def __init__(self) -> None:
        self._entries: dict[str, DeviceEntry] = {}

    def add(self, id: str, kind: str, device: Any, ranges: list[BusRange] | None = None,
            config: dict[str, Any] | None = None) -> DeviceEntry:
        if id in self._entries:
            raise ConfigError("adding a device", detail=f"id {id!r} is already used")
        entry = DeviceEntry(id, kind, device, list(ranges or []), dict(config or {}))
        self._entries[id] = entry
        return entry

    def __iter__(self) -> Iterator[DeviceEntry]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, id: str) -> DeviceEntry:
        return self._entries[id]

    def get(self, id: str) -> DeviceEntry | None:
        return self._entries.get(id)

    def identity(self) -> list[tuple[str, str, dict[str, Any]]]:
        """What a destination must match: (id, kind, configuration) per device."""
        return [(e.id, e.kind, dict(e.config)) for e in self._entries.values() if e.kind not in LOCAL_KINDS]

    def state(self) -> dict[str, Any]:
        """Every stateful device's state, by id (devices are parked: the machine is paused)."""
        return {e.id: e.device.state() for e in self._entries.values() if e.stateful}

    def restore(self, states: dict[str, Any]) -> None:
        """Restore every stateful device. The set of ids must match exactly, before any device
        is touched; each device then validates its own state before it changes."""
        if not isinstance(states, dict):
            raise StateError("restoring devices", detail="the device states are not a table")
        mine = {e.id for e in self._entries.values() if e.stateful}
        theirs = set(states)
        if mine != theirs:
            missing, extra = sorted(mine - theirs), sorted(theirs - mine)
            raise StateError("restoring devices",
                             detail="; ".join(filter(None, (
                                 f"the snapshot lacks {', '.join(missing)}" if missing else "",
                                 f"the snapshot has devices this machine lacks: {', '.join(extra)}" if extra else ""))))
        stateful = [e for e in self._entries.values() if e.stateful]
        for e in stateful:          # every device checks its state before any device changes
            check = getattr(e.device, "check_state", None)
            if check is not None:
                check(states[e.id])
        for e in stateful:
            e.device.restore(states[e.id])

    def describe(self) -> str:
        return "\n".join(e.describe() for e in self._entries.values())
