"""The machine's run state, with QMP's names, and how a run ended.

The states and the transitions between them are QEMU's (qapi/run-state.json), so a QMP client
sees what it would see with QEMU: `query-status` returns these strings verbatim.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass


class RunState(str, enum.Enum):
    PRELAUNCH = "prelaunch"            # built (or being built), vCPUs not yet released (-S)
    RUNNING = "running"
    PAUSED = "paused"                  # QMP `stop` / Machine.pause(): every vCPU parked
    INMIGRATE = "inmigrate"            # waiting for / reading an incoming stream
    POSTMIGRATE = "postmigrate"        # the state went out (saved or migrated); vCPUs parked
    SHUTDOWN = "shutdown"              # the guest or the host ended it
    GUEST_PANICKED = "guest-panicked"
    INTERNAL_ERROR = "internal-error"  # a vCPU or kvmpy failed

    @property
    def ended(self) -> bool:
        return self in (RunState.SHUTDOWN, RunState.GUEST_PANICKED, RunState.INTERNAL_ERROR)

    @property
    def vcpus_parked(self) -> bool:
        """States in which no guest code runs and the whole state may be taken."""
        return self in (RunState.PRELAUNCH, RunState.PAUSED, RunState.POSTMIGRATE, RunState.INMIGRATE)


# Which states `resume()` (QMP `cont`) may leave: QEMU allows cont from these too.
RESUMABLE = (RunState.PRELAUNCH, RunState.PAUSED, RunState.POSTMIGRATE)


@dataclass(frozen=True)
class MachineExit:
    """How a run ended: the process exit status (the CLI's) and one line saying why.
    `guest` is True when the guest itself ended the run (QMP SHUTDOWN's `guest`)."""
    status: int
    reason: str
    guest: bool = True
    run_state: RunState = RunState.SHUTDOWN
