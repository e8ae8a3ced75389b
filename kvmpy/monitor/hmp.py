"""human-monitor-command: the few HMP commands people type into QEMU's monitor, as QEMU prints
them (lines end in \\r\\n, errors are text starting with "Error: ", an unknown command is text
too, never a QMP error)."""
from __future__ import annotations

from typing import Callable

from kvmpy.errors import KvmpyError
from kvmpy.monitor.control import MachineControl
from kvmpy.monitor.schema import QmpError


def _info_status(machine: MachineControl, words: list[str], cpu: int) -> str:
    status = machine.status
    text = "VM status: " + ("running" if status == "running" else "paused")
    if status not in ("running", "paused"):
        text += f" ({status})"
    return text + "\n"


def _cpu_indexes(machine: MachineControl) -> list[int]:
    return [int(entry.get("cpu-index", i)) for i, entry in enumerate(machine.query_cpus())]


def _info_registers(machine: MachineControl, words: list[str], cpu: int) -> str:
    """`info registers` (the current CPU), `info registers -a` (all), `info registers N`."""
    if words and words[0] == "-a":
        parts = []
        for index in _cpu_indexes(machine):
            parts.append(f"\nCPU#{index}\n" + machine.registers_text(index).rstrip("\n") + "\n")
        return "".join(parts)
    if words:
        if not words[0].isdigit():
            return f"Error: invalid vCPU '{words[0]}'\n"
        cpu = int(words[0])
        if cpu not in _cpu_indexes(machine):
            return f"CPU#{cpu} not available\n"
    return machine.registers_text(cpu).rstrip("\n") + "\n"


def _info_name(machine: MachineControl, words: list[str], cpu: int) -> str:
    return f"{machine.name}\n" if machine.name else ""


def _info_version(machine: MachineControl, words: list[str], cpu: int) -> str:
    from kvmpy.monitor.commands import version_info
    info = version_info()
    q = info["qemu"]
    return f"{q['major']}.{q['minor']}.{q['micro']} ({info['package']})\n"


def _info_kvm(machine: MachineControl, words: list[str], cpu: int) -> str:
    return "kvm support: enabled\n"


def _info_cpus(machine: MachineControl, words: list[str], cpu: int) -> str:
    lines = []
    for entry in machine.query_cpus():
        index = entry.get("cpu-index")
        mark = "*" if index == cpu else " "
        lines.append(f"{mark} CPU #{index}: thread_id={entry.get('thread-id')}\n")
    return "".join(lines)


def _info_block(machine: MachineControl, words: list[str], cpu: int) -> str:
    lines = []
    for entry in machine.query_block():
        inserted = entry.get("inserted") or {}
        ro = " (read-only)" if inserted.get("ro") else ""
        lines.append(f"{entry.get('device') or entry.get('qdev')}: {inserted.get('file', '[not inserted]')}"
                     f" ({inserted.get('drv', 'raw')}{ro})\n")
    return "".join(lines)


def _info_migrate(machine: MachineControl, words: list[str], cpu: int) -> str:
    info = machine.query_migrate()
    if not info:
        return ""
    lines = [f"Migration status: {info.get('status', 'none')}\n"]
    for key in ("total-time", "expected-downtime", "downtime", "setup-time"):
        if key in info:
            lines.append(f"{key.replace('-', ' ')}: {info[key]} ms\n")
    for key, value in (info.get("ram") or {}).items():
        lines.append(f"ram {key}: {value}\n")
    return "".join(lines)


_INFO: dict[str, Callable[[MachineControl, list[str], int], str]] = {
    "status": _info_status, "registers": _info_registers, "name": _info_name,
    "version": _info_version, "kvm": _info_kvm, "cpus": _info_cpus, "block": _info_block,
    "migrate": _info_migrate,
}

# HMP spelling -> QMP command it runs (arguments none)
_ACTIONS = {"stop": "stop", "cont": "cont", "c": "cont", "system_reset": "system_reset",
            "system_powerdown": "system_powerdown", "quit": "quit", "q": "quit"}


def _help() -> str:
    names = sorted(set(_ACTIONS) - {"c", "q"})
    return "".join(f"{n}\n" for n in names) + "".join(f"info {n}\n" for n in sorted(_INFO))


def _run(machine: MachineControl, line: str, cpu: int) -> str:
    words = line.split()
    if not words:
        return ""
    head, rest = words[0], words[1:]
    if head in ("help", "?"):
        return _help()
    if head == "info":
        if not rest:
            return "".join(f"info {n}\n" for n in sorted(_INFO))
        handler = _INFO.get(rest[0])
        if handler is None:
            return f"unknown command: 'info {rest[0]}'\n"
        return handler(machine, rest[1:], cpu)
    if head in _ACTIONS:
        from kvmpy.monitor.commands import Deferred, build_commands
        result = build_commands()[_ACTIONS[head]].run(machine, {})
        if isinstance(result, Deferred):
            result.then()
        return ""
    return f"unknown command: '{head}'\n"


def run_hmp(machine: MachineControl, line: str, cpu_index: int | None = None) -> str:
    """One HMP command line -> its output text, with QEMU's \\r\\n line endings."""
    cpus = _cpu_indexes(machine) if cpu_index is not None else []
    if cpu_index is not None and cpu_index not in cpus:
        raise QmpError("Parameter 'cpu-index' expects a CPU number")
    try:
        text = _run(machine, line, cpu_index if cpu_index is not None else 0)
    except QmpError as e:
        text = f"Error: {e.desc}\n"
    except KvmpyError as e:
        text = f"Error: {e}\n"
    return text.replace("\r\n", "\n").replace("\n", "\r\n")
