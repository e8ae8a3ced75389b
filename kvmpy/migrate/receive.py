"""The destination's read of a live migration's stream after CONFIG, apart from the source's
engine (kvmpy.migrate.precopy re-exports it): memory into the destination's RAM, disk blocks
and SYNC markers to their handlers, until the machine's STATE."""
from __future__ import annotations

from typing import Any, Callable

from kvmpy.errors import MigrationError
from kvmpy.migrate.stream import SectionKind


def receive_memory_and_state(reader: Any, targets: list[tuple[int, Any]],
                             on_disk: Callable[[bytes], None] | None = None,
                             on_sync: Callable[[], None] | None = None,
                             on_state: Callable[[bytes], None] | None = None) -> bytes:
    """The destination's read of everything after CONFIG until END: MEMORY_RUNS chunks into
    `targets` [(gpa, writable buffer)], DISK payloads to `on_disk` (block migration), SYNC
    markers to `on_sync` (it answers SYNCED) and the one STATE to `on_state` as it arrives; the
    STATE payload. The switchover's last pages and blocks follow STATE (the source sends it
    first, so that it is loaded while they travel); an older source's STATE came last. Anything
    else (a second STATE, a SYNC after it, a MEMORY_FILE, a DISK or SYNC section nobody takes,
    no STATE) is one MigrationError."""
    state_payload: bytes | None = None
    while (section := reader.next_section()) is not None:
        if section.kind is SectionKind.MEMORY_RUNS:
            reader.read_memory_into(section, targets)
        elif section.kind is SectionKind.DISK and on_disk is not None:
            on_disk(section.payload)
        elif section.kind is SectionKind.SYNC and state_payload is None and on_sync is not None:
            on_sync()
        elif section.kind is SectionKind.STATE and state_payload is None:
            state_payload = section.payload
            if on_state is not None:
                on_state(state_payload)
        else:
            raise MigrationError("reading the migration stream", detail=f"an unexpected {section.kind.name} section")
    if state_payload is None:
        raise MigrationError("reading the migration stream", detail="the machine state is missing")
    return state_payload
