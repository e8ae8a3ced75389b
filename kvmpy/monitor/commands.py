"""The QMP commands: each a schema and a function over the MachineControl Protocol.

Bodies only see arguments that passed their schema. They raise QmpError for QMP-level refusals
(QEMU's wording); a KvmpyError from the machine becomes a GenericError carrying its one line.
`qmp_capabilities` and `query-commands` depend on the session, so `protocol.QmpSession` answers
them itself; they are listed here so `query-commands` shows them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvmpy import __version__
from kvmpy.monitor.control import NEEDS_RESET_STATES, MachineControl
from kvmpy.monitor.schema import Arg, Enum, ListOf, QmpError, Struct, check_members, check_value

MAX_DOWNTIME_MS = 2_000_000          # QEMU's MAX_MIGRATE_DOWNTIME (2000 s)
MAX_BANDWIDTH = (1 << 64) - 1
MIGRATION_ACTIVE = ("setup", "active", "pre-switchover", "device", "postcopy-active",
                    "wait-unplug", "cancelling")
MIGRATION_SCHEMES = ("file:", "exec:", "tcp:", "unix:")


@dataclass(frozen=True)
class Deferred:
    """A reply to send first, then an action to run (QMP `quit` answers before it ends)."""

    value: Any
    then: Callable[[], None]


@dataclass(frozen=True)
class Command:
    name: str
    run: Callable[[MachineControl, dict], Any]
    args: dict[str, Arg]


def version_info() -> dict:
    """query-version. kvmpy reports its own version (it is not QEMU), in QEMU's shape."""
    parts = [int(p) if p.isdigit() else 0 for p in (__version__.split(".") + ["0", "0"])[:3]]
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]},
            "package": f"kvmpy {__version__}"}


def _query_status(machine: MachineControl, args: dict) -> dict:
    status = machine.status
    return {"status": status, "running": status == "running", "singlestep": False}


def _query_name(machine: MachineControl, args: dict) -> dict:
    return {"name": machine.name} if machine.name else {}


def _stop(machine: MachineControl, args: dict) -> dict:
    machine.pause()
    return {}


def _cont(machine: MachineControl, args: dict) -> dict:
    """QEMU's qmp_cont: refused where only a reset helps; prelaunch starts; otherwise resume
    (which in `inmigrate` means: run once the stream is in)."""
    status = machine.status
    if status in NEEDS_RESET_STATES:
        raise QmpError("Resetting the Virtual Machine is required")
    if status == "prelaunch":
        machine.start(paused=False)     # running when it answers, built here if not yet (-S or not)
    elif status != "running":
        machine.resume()
    return {}


def _system_reset(machine: MachineControl, args: dict) -> dict:
    machine.reset()
    return {}


def _system_powerdown(machine: MachineControl, args: dict) -> dict:
    machine.powerdown()
    return {}


def _quit(machine: MachineControl, args: dict) -> Deferred:
    return Deferred({}, machine.stop)


def _hmp(machine: MachineControl, args: dict) -> str:
    from kvmpy.monitor.hmp import run_hmp
    return run_hmp(machine, args["command-line"], args.get("cpu-index"))


def _migration_active(machine: MachineControl) -> bool:
    return machine.query_migrate().get("status") in MIGRATION_ACTIVE


def _migrate(machine: MachineControl, args: dict) -> dict:
    uri = args["uri"]
    if args.get("resume"):
        raise QmpError("kvmpy has no postcopy migration to resume")
    if not uri.startswith(MIGRATION_SCHEMES):
        raise QmpError("Parameter 'uri' expects a valid migration protocol")
    if _migration_active(machine):
        raise QmpError("There's a migration process in progress")
    if args.get("blk"):         # QEMU's old per-migration switch for block migration
        machine.migrate(uri, blk=True)
    else:
        machine.migrate(uri)
    return {}


def _migrate_incoming(machine: MachineControl, args: dict) -> dict:
    uri = args["uri"]
    if machine.status != "inmigrate":
        raise QmpError("'-incoming' was not specified on the command line")
    if not uri.startswith(MIGRATION_SCHEMES):
        raise QmpError("Parameter 'uri' expects a valid migration protocol")
    machine.migrate_incoming(uri)
    return {}


def _migrate_cancel(machine: MachineControl, args: dict) -> dict:
    machine.migrate_cancel()
    return {}


def _set_link(machine: MachineControl, args: dict) -> dict:
    """QEMU's set_link (qapi/net.json): `name` is the NIC's id as the device table shows it
    ("net0" for the first --nic); an unknown name is QEMU's DeviceNotFound."""
    if not machine.set_link(args["name"], args["up"]):
        raise QmpError(f"Device '{args['name']}' not found", "DeviceNotFound")
    return {}


def _parameter_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "uint"
    if isinstance(value, float):
        return "number"
    return "str" if isinstance(value, str) else "any"


def _migrate_set_parameters(machine: MachineControl, args: dict) -> dict:
    """The machine's dict is the schema: the parameters it has, typed as their current values.
    Everything is checked before anything is set."""
    current = machine.migration_parameters
    members = {name: Arg(_parameter_type(value), optional=True) for name, value in current.items()}
    check_members(members, args)
    if "downtime-limit" in args and args["downtime-limit"] > MAX_DOWNTIME_MS:
        raise QmpError("Parameter 'downtime_limit' expects an integer in the range of 0 to "
                       f"{MAX_DOWNTIME_MS} ms")
    current.update(args)
    return {}


def _migrate_set_capabilities(machine: MachineControl, args: dict) -> dict:
    names = tuple(machine.migration_capabilities)
    item = Struct({"capability": Arg(Enum(names)), "state": Arg("bool")})
    check_value("capabilities", ListOf(item), args["capabilities"])
    if _migration_active(machine):
        raise QmpError("There's a migration process in progress")
    for entry in args["capabilities"]:
        machine.migration_capabilities[entry["capability"]] = entry["state"]
    return {}


def _query_migrate_capabilities(machine: MachineControl, args: dict) -> list:
    return [{"capability": name, "state": bool(state)}
            for name, state in machine.migration_capabilities.items()]


def _simple(fn: Callable[[MachineControl], Any]) -> Callable[[MachineControl, dict], Any]:
    return lambda machine, args: fn(machine)


# Names the session answers itself; listed so query-commands reports them.
SESSION_COMMANDS = ("qmp_capabilities", "query-commands")


def build_commands() -> dict[str, Command]:
    """Every command kvmpy's monitor offers, by QMP name."""
    table = [
        Command("query-version", lambda m, a: version_info(), {}),
        Command("query-status", _query_status, {}),
        Command("query-name", _query_name, {}),
        Command("query-kvm", lambda m, a: {"enabled": True, "present": True}, {}),
        Command("query-cpus-fast", _simple(lambda m: m.query_cpus()), {}),
        Command("query-block", _simple(lambda m: m.query_block()), {}),
        Command("stop", _stop, {}),
        Command("cont", _cont, {}),
        Command("system_reset", _system_reset, {}),
        Command("system_powerdown", _system_powerdown, {}),
        Command("quit", _quit, {}),
        Command("set_link", _set_link, {"name": Arg("str"), "up": Arg("bool")}),
        Command("human-monitor-command", _hmp,
                {"command-line": Arg("str"), "cpu-index": Arg("int", optional=True)}),
        Command("migrate", _migrate, {"uri": Arg("str"), "detach": Arg("bool", optional=True),
                                      "resume": Arg("bool", optional=True), "blk": Arg("bool", optional=True)}),
        Command("migrate-incoming", _migrate_incoming,
                {"uri": Arg("str"), "exit-on-error": Arg("bool", optional=True)}),
        Command("migrate_cancel", _migrate_cancel, {}),
        Command("query-migrate", _simple(lambda m: m.query_migrate()), {}),
        Command("migrate-set-parameters", _migrate_set_parameters, {}),   # checked in the body
        Command("query-migrate-parameters", _simple(lambda m: dict(m.migration_parameters)), {}),
        Command("migrate-set-capabilities", _migrate_set_capabilities,
                {"capabilities": Arg(ListOf("any"))}),
        Command("query-migrate-capabilities", _query_migrate_capabilities, {}),
    ]
    return {command.name: command for command in table}


# Commands whose arguments are checked by their body against the machine (not a fixed schema).
DYNAMIC_SCHEMA = frozenset({"migrate-set-parameters"})
