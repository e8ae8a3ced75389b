"""`kvmpy qmp SOCKET COMMAND [key=value ...]`: one QMP command from the shell (QEMU's qmp-shell
in one-shot form: the reply is printed as {"return": ...}; an error reply is one line on stderr
and exit status 1), `events` to follow events, `hmp ...` for human-monitor-command, and a
progress bar for `migrate`.

Values are JSON when they parse as JSON (`downtime-limit=100`, `state=true`, `x=[1,2]`), strings
otherwise (`uri=file:/tmp/vm.snap`); `a.b=1` builds nested objects. tqdm is imported only when a
bar is shown (stdout is a terminal), and json only when a command runs: `kvmpy boot` builds the
same parser, and its start-up must not pay for them.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, TextIO

from kvmpy.errors import ConfigError

MIGRATION_DONE = ("completed", "failed", "cancelled")


def parse_assignments(items: list[str]) -> dict:
    """`key=value` words -> a QMP arguments object."""
    import json
    arguments: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"argument {item!r}", detail="expected key=value")
        try:
            value: Any = json.loads(text)
        except ValueError:
            value = text
        *parents, leaf = key.split(".")
        node = arguments
        for part in parents:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"argument {item!r}", detail=f"'{part}' already has a value")
            node = child
        if leaf in node:
            raise ConfigError(f"argument {item!r}", detail=f"'{key}' given twice")
        node[leaf] = value
    return arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("socket", metavar="SOCKET", help="monitor socket: a path, unix:PATH or tcp:HOST:PORT")
    p.add_argument("qmp_command", metavar="COMMAND",
                   help="a QMP command (query-status, stop, cont, migrate, ...), `events` to "
                        "follow events, or `hmp` followed by a human monitor command line")
    p.add_argument("qmp_args", metavar="key=value", nargs="*", help="command arguments")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
    p.add_argument("--count", type=int, default=0, help="events: stop after this many")
    p.add_argument("--interval", type=float, default=0.2, help="migrate: query-migrate period (s)")


def _print_json(value: Any, out: TextIO) -> None:
    import json
    print(json.dumps(value, indent=2 if out.isatty() else None), file=out)


def _follow_events(client: Any, count: int, out: TextIO) -> int:
    import json
    from kvmpy.monitor.client import MonitorClosed
    seen = 0
    while not count or seen < count:
        try:
            event = client.next_event(timeout=None)
        except MonitorClosed:      # the VM ended (quit, poweroff): the end of the event stream
            break
        if event is None:
            break
        print(json.dumps(event), file=out, flush=True)
        seen += 1
    return 0


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _statistics(info: dict) -> str:
    ram = info.get("ram") or {}
    parts = [f"status: {info.get('status')}"]
    for key in ("total-time", "downtime", "setup-time", "expected-downtime"):
        if key in info:
            parts.append(f"{key}: {info[key]} ms")
    for key in ("transferred", "remaining", "total"):
        if key in ram:
            parts.append(f"{key}: {_human(ram[key])}")
    if "mbps" in ram:
        parts.append(f"rate: {ram['mbps']:.1f} Mbit/s")
    return "\n".join(parts)


def _migrate(client: Any, arguments: dict, interval: float, out: TextIO) -> int:
    """Start the migration, follow query-migrate until it ends, print the final statistics.
    Ctrl-C cancels the migration (the source keeps running) instead of leaving it behind."""
    client.execute("migrate", arguments)
    bar = None
    if out.isatty():
        from tqdm import tqdm    # lazy: only a terminal user pays for it
        bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=out,
                   desc="migrate", dynamic_ncols=True)
    info: dict = {}
    try:
        while True:
            info = client.execute("query-migrate") or {}
            ram = info.get("ram") or {}
            if bar is not None and ram:
                bar.total = ram.get("total", bar.total)
                bar.n = ram.get("transferred", bar.n)
                bar.set_postfix(remaining=_human(ram.get("remaining", 0)),
                                downtime=f"{info.get('expected-downtime', '?')} ms", refresh=False)
                bar.refresh()
            if info.get("status") in MIGRATION_DONE:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        client.execute("migrate_cancel")
        print("kvmpy: migration cancelled", file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    print(_statistics(info), file=out)
    if info.get("status") != "completed":
        detail = info.get("error-desc") or info.get("status")
        print(f"kvmpy: error: migration {detail}", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    from kvmpy.monitor.client import QmpClient
    out = out or sys.stdout
    command = args.qmp_command
    with QmpClient(args.socket, timeout=args.timeout) as client:
        if command == "events":
            if args.qmp_args:
                raise ConfigError("kvmpy qmp events", detail="takes no arguments")
            return _follow_events(client, args.count, out)
        if command == "hmp":
            text = client.execute("human-monitor-command", {"command-line": " ".join(args.qmp_args)})
            out.write(str(text).replace("\r\n", "\n"))
            return 0
        arguments = parse_assignments(args.qmp_args)
        if command == "migrate":
            return _migrate(client, arguments, args.interval, out)
        _print_json({"return": client.execute(command, arguments or None)}, out)
    return 0
