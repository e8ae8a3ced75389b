"""kvmpy.monitor: the QMP-compatible control socket.

The monitor talks to a machine only through `control.MachineControl`. The CLI starts one server
per `--qmp` spec with `start_monitors`, and before starting the guest calls `wait_for_clients`
(QEMU's `wait=on`: the guest is held until a client connects).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

if TYPE_CHECKING:
    from kvmpy.monitor.control import MachineControl
    from kvmpy.monitor.server import QmpServer

log = logging.getLogger(__name__)


def start_monitors(machine: "MachineControl", specs: Iterable[str]) -> list["QmpServer"]:
    """Parse and start a QmpServer for each `--qmp` spec; on any failure close the ones already
    started and re-raise (a ConfigError naming the spec)."""
    from kvmpy.monitor.server import QmpServer
    from kvmpy.monitor.spec import parse_server_spec
    parsed = [parse_server_spec(spec) for spec in specs]     # every spec checked before binding
    servers: list[QmpServer] = []
    try:
        for spec in parsed:
            servers.append(QmpServer(machine, spec).start())
    except BaseException:
        for server in servers:
            server.close()
        raise
    return servers


def wait_for_clients(servers: Iterable["QmpServer"], timeout: float | None = None) -> bool:
    """Block until every server whose spec says wait=on has had a client connect."""
    return all(server.wait_for_client(timeout) for server in servers if server.spec.wait)


def close_monitors(servers: Iterable["QmpServer"]) -> None:
    for server in servers:
        server.close()


@contextmanager
def serve_monitors(machine: "MachineControl", specs: Iterable[str]) -> Iterator[list["QmpServer"]]:
    """The CLI's one call: start a monitor per `--qmp` spec, hold (before the guest starts)
    until each wait=on monitor has a client, as QEMU does, and close them all on the way out.

        with Machine(config) as machine, serve_monitors(machine, args.qmp):
            machine.start(); machine.run()
    """
    specs = list(specs)
    if not specs:
        yield []
        return
    servers = start_monitors(machine, specs)
    try:
        waiting = [s for s in servers if s.spec.wait]
        if waiting:
            log.warning("waiting for a QMP client on %s (wait=on)",
                        ", ".join(s.spec.describe() for s in waiting))
            wait_for_clients(waiting)
        yield servers
    finally:
        close_monitors(servers)
