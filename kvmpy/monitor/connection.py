"""One QMP connection's state (session, input splitter, bounded output queue) and the helpers
the server's two threads share. Kept apart from the server so each file stays readable."""
from __future__ import annotations

import json
import socket
import threading
from collections import deque
from typing import Any

from kvmpy.monitor.control import MachineControl
from kvmpy.monitor.jsonstream import JsonStreamer
from kvmpy.monitor.protocol import QmpSession

# Commands that never wait on the machine (they read plain attributes or the session): the I/O
# thread answers them itself, so negotiation and status queries of one client are not stuck
# behind another client's `stop` waiting for vCPUs to park.
IMMEDIATE_COMMANDS = frozenset({"qmp_capabilities", "query-commands", "query-version", "query-kvm",
                                "query-name", "query-status"})


def answers_at_once(item: tuple[str, Any]) -> bool:
    kind, value = item
    return kind == "error" or not isinstance(value, dict) or value.get("execute") in IMMEDIATE_COMMANDS


def encode(message: dict) -> bytes:
    return json.dumps(message, separators=(", ", ": ")).encode() + b"\r\n"


class Client:
    """One connection: its protocol session, its input splitter and its bounded output."""

    def __init__(self, sock: socket.socket, peer: str, machine: MachineControl,
                 max_message_bytes: int, max_output: int):
        self.sock = sock
        self.peer = peer
        self.session = QmpSession(machine)
        self.streamer = JsonStreamer(max_message_bytes)
        self.max_output = max_output
        self.lock = threading.Lock()
        self.out: deque[bytes] = deque()
        self.out_bytes = 0
        self.pending = 0            # requests handed to the dispatcher, not yet answered
        self.overflowed = False
        self.closed = False
        self.mask = 0               # what the selector watches for now

    def enqueue(self, data: bytes) -> None:
        """Queue output from any thread; never blocks. Overflow marks the client for dropping."""
        with self.lock:
            if self.closed or self.overflowed:
                return
            if self.out_bytes + len(data) > self.max_output:
                self.overflowed = True
                self.out.clear()
                self.out_bytes = 0
                return
            self.out.append(data)
            self.out_bytes += len(data)

    def has_output(self) -> bool:
        with self.lock:
            return bool(self.out)
