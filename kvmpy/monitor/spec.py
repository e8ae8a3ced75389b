"""`--qmp` specifications in QEMU's chardev syntax: `unix:PATH,server=on,wait=off` and
`tcp:HOST:PORT,server=on,wait=off`.

Kept apart from the server so the CLI (and `kvmpy qmp`, which takes the same spellings to name a
socket to connect to) can parse a spec without importing sockets and threads.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvmpy.errors import ConfigError

_BOOL_WORDS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


@dataclass(frozen=True)
class QmpSpec:
    """One monitor endpoint. `path` for unix sockets; `host`/`port` for tcp ("" host: every
    interface, port 0: the kernel picks one)."""

    kind: str                 # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0
    server: bool = True
    wait: bool = True         # QEMU's default: hold the guest until a client connects

    def describe(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def _bool_option(spec: str, key: str, value: str | None) -> bool:
    if value is None:          # QEMU's bare `server` / `wait`
        return True
    try:
        return _BOOL_WORDS[value.lower()]
    except KeyError:
        raise ConfigError(f"parsing --qmp {spec!r}",
                          detail=f"Parameter '{key}' expects 'on' or 'off'") from None


def _split_host_port(spec: str, address: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[V6]:PORT`, as QEMU's inet_parse reads them."""
    if address.startswith("["):
        close = address.find("]")
        if close < 0 or address[close + 1:close + 2] != ":":
            raise ConfigError(f"parsing --qmp {spec!r}", detail=f"error parsing IPv6 address '{address}'")
        host, port_text = address[1:close], address[close + 2:]
    else:
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ConfigError(f"parsing --qmp {spec!r}", detail=f"error parsing address '{address}'")
        if ":" in host:
            raise ConfigError(f"parsing --qmp {spec!r}",
                              detail=f"error parsing address '{address}' (IPv6 hosts go in brackets)")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"parsing --qmp {spec!r}", detail=f"port '{port_text}' is not a valid port number")
    return host, int(port_text)


def parse_qmp_spec(spec: str) -> QmpSpec:
    """Parse a `--qmp` argument; raise ConfigError with QEMU-like wording for anything else.

    A bare path (no `unix:`) is accepted as `unix:PATH` for `kvmpy qmp SOCKET`; `--qmp` callers
    that want QEMU's strictness check `kind` themselves. Only server sockets are offered: kvmpy's
    monitor never connects out, so `server=off` is refused rather than silently ignored.
    """
    if not spec:
        raise ConfigError("parsing --qmp ''", detail="empty specification")
    head, *options = spec.split(",")
    kind, sep, address = head.partition(":")
    if not sep:
        if "/" in head or head.endswith(".sock"):
            kind, address = "unix", head
        else:
            raise ConfigError(f"parsing --qmp {spec!r}",
                              detail="expected unix:PATH or tcp:HOST:PORT (with ,server=on,wait=off)")
    server, wait = False, True
    for option in options:
        key, eq, value = option.partition("=")
        value_or_none = value if eq else None
        if key == "server":
            server = _bool_option(spec, key, value_or_none)
        elif key == "wait":
            wait = _bool_option(spec, key, value_or_none)
        elif key == "nowait" and not eq:   # QEMU's legacy spelling of wait=off
            wait = False
        else:
            raise ConfigError(f"parsing --qmp {spec!r}", detail=f"Invalid parameter '{key}'")
    if kind == "unix":
        if not address:
            raise ConfigError(f"parsing --qmp {spec!r}", detail="unix socket path missing")
        if len(address.encode()) >= 108:
            raise ConfigError(f"parsing --qmp {spec!r}",
                              detail=f"UNIX socket path '{address}' is too long (max 107 bytes)")
        return QmpSpec("unix", path=address, server=server, wait=wait)
    if kind == "tcp":
        host, port = _split_host_port(spec, address)
        return QmpSpec("tcp", host=host, port=port, server=server, wait=wait)
    raise ConfigError(f"parsing --qmp {spec!r}", detail=f"'{kind}' is not a valid char driver name "
                      "(kvmpy's monitor offers unix: and tcp:)")


def parse_server_spec(spec: str) -> QmpSpec:
    """Parse a `--qmp` argument for the VMM side: it must be a listening socket."""
    parsed = parse_qmp_spec(spec)
    if not parsed.server:
        raise ConfigError(f"parsing --qmp {spec!r}",
                          detail="kvmpy's monitor only listens: add server=on (and wait=off "
                                 "to boot without waiting for a client)")
    return parsed
