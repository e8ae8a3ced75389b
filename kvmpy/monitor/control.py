"""The narrow interface the monitor drives a machine through.

The monitor never reaches into the machine's insides (vCPUs, devices, memory): it calls these
methods and listens to these events, so it can be tested in tier 0 against a fake machine and the
real `kvmpy.machine.Machine` only has to satisfy this Protocol. Every method may be called from
the monitor's dispatch thread while the machine runs on its own threads.
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Protocol, runtime_checkable

# QMP's RunState names (qapi/run-state.json), the only values `status` may take.
RUN_STATES = ("prelaunch", "running", "paused", "inmigrate", "postmigrate", "shutdown",
              "guest-panicked", "internal-error")
# States QEMU's `cont` refuses with "Resetting the Virtual Machine is required".
NEEDS_RESET_STATES = ("shutdown", "guest-panicked", "internal-error")

# Events the machine emits through its listeners, as (name, data). The monitor forwards them
# unchanged, adding QEMU's timestamp.
EVENT_NAMES = ("STOP", "RESUME", "RESET", "POWERDOWN", "SHUTDOWN", "GUEST_PANICKED",
               "MIGRATION", "MIGRATION_PASS")

EventListener = Callable[[str, dict], None]


@runtime_checkable
class MachineControl(Protocol):
    """What the QMP monitor needs of a machine.

    Listeners are called from arbitrary machine threads and must not block: the monitor only
    timestamps the event and queues it per client.
    """

    # Read-only properties here, so a plain attribute or a property both satisfy the Protocol.
    @property
    def name(self) -> str | None:
        """--name, for query-name."""

    @property
    def status(self) -> str:
        """One of RUN_STATES."""

    @property
    def monitor_gate(self) -> ContextManager[Any]:
        """The lock every queued command runs under: a migration holds it from the source's
        pause until the last byte is out, as QEMU's stop-and-copy holds the BQL, so a client
        polling query-migrate does not take the GIL inside the downtime. Optional: the server
        never holds up a machine (an embedder's own) that has none."""

    @property
    def migration_parameters(self) -> dict:
        """"downtime-limit" (ms), "max-bandwidth" (bytes/s), ...: the monitor updates this dict
        in place (migrate-set-parameters) after checking every value against the current ones'
        types; its keys are the parameters the machine supports."""

    @property
    def migration_capabilities(self) -> dict:
        """Capability name -> bool, updated in place (migrate-set-capabilities); its keys are
        the capabilities the machine supports."""

    def start(self, paused: bool | None = None) -> None:
        """Leave prelaunch (QMP `cont`, paused=False: running on return, built first if the
        machine is not yet)."""

    def pause(self) -> None:
        """Return when every vCPU is parked; a no-op when already paused."""

    def resume(self) -> None:
        """Run again after pause(); in `inmigrate`, run once the incoming stream completes
        (QEMU's autostart)."""

    def reset(self) -> None:
        """system_reset."""

    def powerdown(self) -> None:
        """Press the ACPI power button (system_powerdown): the guest shuts itself down."""

    def stop(self) -> None:
        """End the machine (QMP `quit`); emits SHUTDOWN {"guest": false, "reason": "host-qmp-quit"}."""

    def add_listener(self, fn: EventListener) -> None: ...

    def remove_listener(self, fn: EventListener) -> None: ...

    def query_cpus(self) -> list[dict]:
        """query-cpus-fast entries: cpu-index, thread-id, target, props, ..."""

    def query_block(self) -> list[dict]:
        """query-block entries: device, qdev, inserted{file, ro, drv, ...}, ..."""

    def set_link(self, name: str, up: bool) -> bool:
        """QMP set_link: NIC `name` (its device id, "net0", ...) up or down; False when the
        machine has no NIC of that name."""

    def registers_text(self, cpu_index: int) -> str:
        """HMP `info registers` for one vCPU; raises KvmpyError for a vCPU that does not exist."""

    def migrate(self, uri: str) -> None:
        """Start an outgoing migration in the background; raise KvmpyError if refused."""

    def migrate_incoming(self, uri: str) -> None:
        """Start the incoming side (for --incoming defer)."""

    def migrate_cancel(self) -> None: ...

    def query_migrate(self) -> dict:
        """QMP query-migrate: status, ram{transferred, remaining, total, ...}, total-time,
        downtime, expected-downtime, setup-time (only the keys that apply)."""
