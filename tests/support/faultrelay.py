"""A TCP relay between a live migration's source and destination that fails on cue: it cuts
both connections on demand, drops a chosen reply of the destination and cuts instead, or flips
one byte of the stream. Tier 1 puts it on loopback between an API source and a `kvmpy boot
--incoming` process; tier 2 inside the destination's network namespace (tests/tier2/netns.py).
listening() tells when a destination listens without connecting to it (`--incoming` takes one
peer: a probe would be its migration)."""
from __future__ import annotations

import socket
import threading
from typing import Callable


def listening(pid: int, port: int) -> bool:
    """Whether process `pid` (any namespace: /proc/PID/net is its namespace's) has a TCP socket
    listening on `port`."""
    try:
        with open(f"/proc/{pid}/net/tcp") as table:
            rows = table.read().splitlines()[1:]
    except OSError:
        return False
    for row in rows:
        fields = row.split()
        if len(fields) > 3 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
            return True
    return False


class FaultRelay:
    """Forwards one connection from `listen` (host, port) to `target`, failing on cue:

    - cut(): both connections shut down now (the source gets EOF/EPIPE, the destination EOF);
    - drop_reply=WORD: the destination's first reply line starting with WORD is not forwarded,
      and the relay cuts instead (KVMPY-ACCEPT: during setup; KVMPY-LOADED: during switchover,
      the destination holding the whole guest, the source waiting for its word);
    - flip_at=N: byte N of the source's stream reaches the destination inverted (a corrupt
      stream; the connection stays up).

    `forwarded` counts the source's bytes passed on; `cut_reason` says why it cut (or None).
    `make_socket` makes both of its TCP sockets (tier 2: netns.socket_in, inside a namespace)."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], drop_reply: bytes | None = None,
                 flip_at: int | None = None, make_socket: Callable[[], socket.socket] = socket.socket):
        self.target, self.drop_reply, self.flip_at = target, drop_reply, flip_at
        self.server = make_socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(listen)
        self.server.listen(1)
        self.upstream = make_socket()
        self.client: socket.socket | None = None
        self.forwarded = 0
        self.flipped = False
        self.cut_reason: str | None = None
        self.connected = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fault-relay", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.server.settimeout(300)
        try:
            client, _ = self.server.accept()
        except OSError:
            return
        finally:
            self.server.close()
        with self._lock:
            self.client = client
            if self.cut_reason is not None:
                self._shut(client)
                return
        try:
            self.upstream.connect(self.target)
        except OSError as exc:
            self.cut(f"could not reach the destination: {exc}")
            return
        self.connected.set()
        back = threading.Thread(target=self._pump_replies, name="fault-relay-back", daemon=True)
        back.start()
        self._pump_stream()

    def _pump_stream(self) -> None:
        assert self.client is not None
        while True:
            try:
                data = bytearray(self.client.recv(1 << 16))
            except OSError as exc:
                self.cut(f"the source's side failed: {exc}")
                return
            if not data:
                self.cut("the source closed")
                return
            if self.flip_at is not None and self.forwarded <= self.flip_at < self.forwarded + len(data):
                data[self.flip_at - self.forwarded] ^= 0xFF
                self.flipped = True
            try:
                self.upstream.sendall(data)
            except OSError as exc:      # the destination went away: so does the source's connection
                self.cut(f"the destination closed: {exc}")
                return
            self.forwarded += len(data)

    def _pump_replies(self) -> None:
        assert self.client is not None
        pending = b""
        while True:
            try:
                data = self.upstream.recv(4096)
            except OSError as exc:
                self.cut(f"the destination closed: {exc}")
                return
            if not data:
                self.cut("the destination closed")
                return
            if self.drop_reply is None:
                out = data
            else:
                pending += data
                lines = pending.split(b"\n")
                pending = lines.pop()           # an unfinished line waits for its end
                out = b""
                for line in lines:
                    if line.startswith(self.drop_reply):
                        self._send_back(out)
                        self.cut(f"dropped the destination's {line[:40]!r}")
                        return
                    out += line + b"\n"
            if not self._send_back(out):
                self.cut("the source's side failed")
                return

    def _send_back(self, data: bytes) -> bool:
        try:
            assert self.client is not None
            self.client.sendall(data)
            return True
        except OSError:
            return False

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def cut(self, reason: str = "cut on demand") -> None:
        """Shut both connections down now (idempotent: the first reason stays)."""
        with self._lock:
            if self.cut_reason is None:
                self.cut_reason = reason
            for sock in (self.client, self.upstream):
                if sock is not None:
                    self._shut(sock)

    def close(self) -> None:
        self.cut("closed")
        self._shut(self.server)             # ends an accept() still waiting
        self._thread.join(10)
        for sock in (self.client, self.upstream, self.server):
            if sock is not None:
                sock.close()
