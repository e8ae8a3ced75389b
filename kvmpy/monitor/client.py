"""A small synchronous QMP client (for `kvmpy qmp`, the pytest plugin and tests).

Blocking sockets with a timeout: one command at a time, events that arrive while waiting for a
reply are kept for `next_event`. Every failure (no socket, a dead peer, a reply that is not QMP,
a timeout) is a MonitorError with one clear line; an error *reply* is a QmpCommandError carrying
QEMU's class and description.
"""
from __future__ import annotations

import json
import socket
import time
from collections import deque
from typing import Any

from kvmpy.errors import KvmpyError
from kvmpy.monitor.spec import QmpSpec, parse_qmp_spec

MAX_REPLY_LINE = 64 << 20


class MonitorError(KvmpyError):
    """Talking to a QMP monitor failed (connect, dead peer, not QMP, timeout)."""


class MonitorClosed(MonitorError):
    """The monitor closed the connection (the VM ended, or it dropped this client)."""


class QmpCommandError(MonitorError):
    """The monitor answered a command with {"error": {"class", "desc"}}."""

    def __init__(self, command: str, error_class: str, desc: str):
        self.error_class = error_class
        self.desc = desc
        super().__init__(f"QMP command {command}", detail=f"{error_class}: {desc}")


class QmpClient:
    """`with QmpClient("unix:/tmp/qmp.sock") as qmp: qmp.execute("query-status")`."""

    def __init__(self, address: str | QmpSpec, timeout: float = 10.0):
        self.spec = parse_qmp_spec(address) if isinstance(address, str) else address
        self.timeout = timeout
        self.greeting: dict | None = None
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._events: deque[dict] = deque()
        self._next_id = 0

    def connect(self, negotiate: bool = True) -> dict:
        what = f"connecting to the QMP monitor {self.spec.describe()}"
        try:
            if self.spec.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                try:
                    sock.connect(self.spec.path)
                except OSError:
                    sock.close()
                    raise
            else:
                sock = socket.create_connection((self.spec.host or "localhost", self.spec.port),
                                                timeout=self.timeout)
        except OSError as e:
            raise MonitorError(what, e.errno, None if e.errno else str(e)) from None
        self._sock = sock
        message = self._read_message(what)
        if not isinstance(message, dict) or "QMP" not in message:
            self.close()
            raise MonitorError(what, detail=f"no QMP greeting (got {str(message)[:80]})")
        self.greeting = message
        if negotiate:
            self.execute("qmp_capabilities")
        return message

    def __enter__(self) -> "QmpClient":
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    # ---- messages -----------------------------------------------------------------------
    def _read_message(self, what: str, timeout: float | None = None) -> Any:
        assert self._sock is not None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            newline = self._buf.find(b"\n")
            if newline >= 0:
                line = bytes(self._buf[:newline])
                del self._buf[:newline + 1]
                if not line.strip():
                    continue
                try:
                    return json.loads(line)
                except ValueError:
                    raise MonitorError(what, detail=f"the monitor sent something that is not JSON: {line[:80]!r}") from None
            if len(self._buf) > MAX_REPLY_LINE:
                raise MonitorError(what, detail="the monitor sent a line over 64 MiB")
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except socket.timeout:
                raise TimeoutError from None
            except OSError as e:
                raise MonitorError(what, e.errno) from None
            if not chunk:
                raise MonitorClosed(what, detail="the monitor closed the connection")
            self._buf += chunk

    def send_raw(self, data: bytes) -> None:
        """Send bytes as they are (tests use this to send garbage)."""
        assert self._sock is not None, "not connected"
        try:
            self._sock.sendall(data)
        except OSError as e:
            raise MonitorError(f"writing to the QMP monitor {self.spec.describe()}", e.errno) from None

    def command(self, name: str, arguments: dict | None = None) -> dict:
        """Send one command and return the whole reply ({"return": ...} or {"error": ...})."""
        if self._sock is None:
            raise MonitorError(f"QMP command {name}", detail="not connected")
        self._next_id += 1
        request: dict[str, Any] = {"execute": name, "id": f"kvmpy-{self._next_id}"}
        if arguments:
            request["arguments"] = arguments
        self.send_raw(json.dumps(request).encode() + b"\n")
        what = f"waiting for the reply to {name}"
        try:
            while True:
                message = self._read_message(what)
                if isinstance(message, dict) and "event" in message:
                    self._events.append(message)
                    continue
                if isinstance(message, dict) and message.get("id") == request["id"]:
                    return message
                if isinstance(message, dict) and "id" not in message and "error" in message:
                    return message      # an error about the request itself (QEMU may drop id)
        except TimeoutError:
            raise MonitorError(what, detail=f"no reply within {self.timeout:g} s") from None

    def execute(self, name: str, arguments: dict | None = None) -> Any:
        """Send one command and return its `return` value; an error reply raises QmpCommandError."""
        reply = self.command(name, arguments)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise QmpCommandError(name, str(error.get("class", "?")), str(error.get("desc", reply)))
        return reply.get("return")

    def next_event(self, timeout: float | None = None) -> dict | None:
        """The next event (queued or arriving within `timeout` seconds, None: forever), or None."""
        if self._events:
            return self._events.popleft()
        if self._sock is None:
            return None
        wait = 1e9 if timeout is None else timeout
        try:
            while True:
                message = self._read_message("waiting for QMP events", timeout=wait)
                if isinstance(message, dict) and "event" in message:
                    return message
        except TimeoutError:
            return None

    def wait_event(self, name: str, timeout: float) -> dict:
        """Wait for one event by name (other events are skipped); MonitorError on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            event = self.next_event(max(left, 0.0)) if left > 0 else None
            if event is None:
                raise MonitorError(f"waiting for QMP event {name}", detail=f"none within {timeout:g} s")
            if event.get("event") == name:
                return event
