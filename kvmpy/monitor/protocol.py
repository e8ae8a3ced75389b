"""One QMP session's protocol state machine, without sockets: greeting, capability negotiation,
request checking and dispatch, error shapes, event messages.

Kept free of I/O so tier 0 can drive it directly (and with random JSON from hypothesis); the
server only moves bytes. A request never raises out of `handle`: whatever a client sends and
whatever a command does, the answer is a QMP reply.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from kvmpy.errors import KvmpyError
from kvmpy.monitor.commands import (DYNAMIC_SCHEMA, SESSION_COMMANDS, Command, Deferred,
                                    build_commands, version_info)
from kvmpy.monitor.control import MachineControl
from kvmpy.monitor.schema import Arg, Enum, ListOf, QmpError, check_arguments
from kvmpy.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_ratelimited = RateLimitedLog(log)

_CAPABILITIES_ARGS = {"enable": Arg(ListOf(Enum(("oob",))), optional=True)}
NEGOTIATION_HINT = "Expecting capabilities negotiation with 'qmp_capabilities'"


def greeting() -> dict:
    """The first message on every connection. kvmpy offers no capabilities (no OOB)."""
    return {"QMP": {"version": version_info(), "capabilities": []}}


def event_message(name: str, data: dict | None, now: float | None = None) -> dict:
    """An asynchronous event with QEMU's timestamp (wall clock, seconds + microseconds)."""
    now = time.time() if now is None else now
    seconds = int(now)
    message: dict[str, Any] = {"event": name, "timestamp": {
        "seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}}
    if data:
        message["data"] = data
    return message


def error_reply(desc: str, error_class: str = "GenericError", request_id: Any = None,
                has_id: bool = False) -> dict:
    reply: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        reply["id"] = request_id
    return reply


def _check_request(request: dict) -> tuple[str, dict]:
    """QEMU's qmp_dispatch_check_obj: the request's own members, before the command's."""
    for key, value in request.items():
        if key == "execute":
            if not isinstance(value, str):
                raise QmpError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QmpError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QmpError(f"QMP input member '{key}' is unexpected")
    if "execute" not in request:
        raise QmpError("QMP input lacks member 'execute'")
    return request["execute"], request.get("arguments", {})


class QmpSession:
    """A client's view of the monitor: before `qmp_capabilities` only that command exists;
    after it every command, and events are delivered (`negotiated`)."""

    def __init__(self, machine: MachineControl, commands: dict[str, Command] | None = None):
        self.machine = machine
        self.commands = commands if commands is not None else build_commands()
        self.negotiated = False

    def command_names(self) -> list[str]:
        return list(SESSION_COMMANDS) + list(self.commands)

    def handle(self, item: tuple[str, Any]) -> tuple[dict | None, Deferred | None]:
        """One item from the JSON streamer -> (reply, action to run after sending it)."""
        kind, value = item
        if kind == "error":
            return error_reply(value), None
        return self.handle_request(value)

    def handle_request(self, request: Any) -> tuple[dict, Deferred | None]:
        if not isinstance(request, dict):
            return error_reply("QMP input must be a JSON object"), None
        has_id, request_id = "id" in request, request.get("id")
        try:
            name, arguments = _check_request(request)
            result = self._dispatch(name, arguments)
        except QmpError as e:
            return error_reply(e.desc, e.error_class, request_id, has_id), None
        deferred = result if isinstance(result, Deferred) else None
        reply: dict[str, Any] = {"return": deferred.value if deferred else result}
        if has_id:
            reply["id"] = request_id
        return reply, deferred

    def _dispatch(self, name: str, arguments: dict) -> Any:
        if not self.negotiated:
            if name != "qmp_capabilities":
                raise QmpError(NEGOTIATION_HINT, "CommandNotFound")
            check_arguments(_CAPABILITIES_ARGS, arguments)
            if arguments.get("enable"):
                raise QmpError(f"Capability {', '.join(arguments['enable'])} not available")
            self.negotiated = True
            return {}
        if name == "qmp_capabilities":
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        if name == "query-commands":
            check_arguments({}, arguments)
            return [{"name": n} for n in self.command_names()]
        command = self.commands.get(name)
        if command is None:
            raise QmpError(f"The command {name} has not been found", "CommandNotFound")
        if name not in DYNAMIC_SCHEMA:
            check_arguments(command.args, arguments)
        try:
            result = command.run(self.machine, arguments)
        except QmpError:
            raise
        except KvmpyError as e:
            raise QmpError(str(e)) from None
        except Exception as e:  # a bug in kvmpy: the client gets one line, the log the trace
            _ratelimited.log(logging.ERROR, ("qmp-internal", name), "QMP command %s failed",
                             name, exc_info=True)
            raise QmpError(f"internal error in {name}: {type(e).__name__}: {e}") from None
        return {} if result is None else result
