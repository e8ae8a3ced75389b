"""The QMP server: listening sockets, one I/O thread (selectors, non-blocking sockets) and one
dispatch thread that runs commands in order, as QEMU's monitor does.

Why two threads: a command such as `stop` waits for every vCPU to park, and must not stop the
server from greeting new clients, reading, or delivering events meanwhile; the I/O thread never
calls a machine method that may wait (it answers only negotiation and plain queries itself,
connection.IMMEDIATE_COMMANDS, and only when that client has nothing queued, so replies stay in
order). Why bounded queues: a client that never reads must cost at most
`max_output_bytes` of memory; past that it is dropped, and the machine (whose event listener only
appends to queues) and the other clients never notice. A client sending faster than commands
run stops being read after `max_pending` queued requests (TCP/unix back-pressure, like QEMU's
monitor suspend).
"""
from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import threading
import time
from contextlib import nullcontext
from typing import Any

from kvmpy import sandbox
from kvmpy.errors import ConfigError
from kvmpy.monitor.control import MachineControl
from kvmpy.monitor.listen import bind_tcp, bind_unix, remove_unix_socket
from kvmpy.monitor.connection import Client as _Client, answers_at_once as _answers_at_once, encode as _encode
from kvmpy.monitor.jsonstream import DEFAULT_MAX_MESSAGE
from kvmpy.monitor.protocol import error_reply, event_message, greeting
from kvmpy.monitor.spec import QmpSpec, parse_server_spec
from kvmpy.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)
_ratelimited = RateLimitedLog(log)

DEFAULT_MAX_CLIENTS = 64
DEFAULT_MAX_OUTPUT = 1 << 20
DEFAULT_MAX_PENDING = 8
_RECV_SIZE = 65536


class QmpServer:
    """A QMP monitor on one `--qmp` endpoint. `start()` binds and spawns the threads;
    `close()` ends them, closes every connection and removes the unix socket file."""

    def __init__(self, machine: MachineControl, spec: QmpSpec | str, *,
                 max_clients: int = DEFAULT_MAX_CLIENTS, max_output_bytes: int = DEFAULT_MAX_OUTPUT,
                 max_pending: int = DEFAULT_MAX_PENDING,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE):
        self.machine = machine
        # a machine that has none (an embedder's own MachineControl) is never held up
        self._gate = getattr(machine, "monitor_gate", None) or nullcontext()
        self.spec = parse_server_spec(spec) if isinstance(spec, str) else spec
        self.max_clients = max_clients
        self.max_output_bytes = max_output_bytes
        self.max_pending = max_pending
        self.max_message_bytes = max_message_bytes
        self._listener: socket.socket | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._wake_lock = threading.Lock()
        self._clients: dict[int, _Client] = {}
        self._clients_lock = threading.Lock()
        self._requests: queue.Queue[tuple[_Client, Any] | None] = queue.Queue()
        self._closing = False
        self._client_connected = threading.Event()
        self._io_thread: threading.Thread | None = None
        self._dispatch_thread: threading.Thread | None = None
        self.address: str | tuple[str, int] = ""
        self._sandbox = sandbox.inherited()   # the machine's policy, for both threads (kvmpy.sandbox)

    # ---- life ---------------------------------------------------------------------------
    def start(self) -> "QmpServer":
        self._listener = self._bind()
        try:
            self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            self._selector = selectors.DefaultSelector()
            self._selector.register(self._listener, selectors.EVENT_READ, "listen")
            self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        except OSError as e:     # EMFILE and friends: give back what was taken, one clear line
            if self._selector is not None:
                self._selector.close()
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            self._close_listener()
            raise ConfigError(f"starting the QMP monitor on {self.spec.describe()}", e.errno) from None
        self.machine.add_listener(self._on_event)
        self._io_thread = threading.Thread(target=self._io_loop, name=f"qmp-io {self.spec.describe()}",
                                           daemon=True)
        self._dispatch_thread = threading.Thread(target=self._dispatch_loop, daemon=True,
                                                 name=f"qmp-dispatch {self.spec.describe()}")
        self._io_thread.start()
        self._dispatch_thread.start()
        log.info("QMP monitor listening on %s", self.spec.describe())
        return self

    def __enter__(self) -> "QmpServer":
        return self.start() if self._listener is None else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_for_client(self, timeout: float | None = None) -> bool:
        """Block until a first client has connected (QEMU's `wait=on`); False on timeout."""
        return self._client_connected.wait(timeout)

    @property
    def client_count(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    def close(self, flush_timeout: float = 1.0) -> None:
        """Stop serving: give queued replies up to `flush_timeout` to go out (so `quit`'s
        answer arrives), then close every connection and remove the socket file."""
        if self._closing or self._listener is None:
            return
        deadline = time.monotonic() + flush_timeout
        while time.monotonic() < deadline and any(c.has_output() for c in self._snapshot()):
            time.sleep(0.01)
        self._closing = True
        try:
            self.machine.remove_listener(self._on_event)
        except Exception:   # the machine may already be gone; closing must still finish
            log.debug("remove_listener failed", exc_info=True)
        self._requests.put(None)
        self._wake()
        for thread in (self._io_thread, self._dispatch_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5.0)
        for client in self._snapshot():
            self._drop(client, None)
        if self._selector is not None:
            self._selector.close()
        with self._wake_lock:    # an event listener in flight must not write to a reused fd
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
        self._close_listener()
        log.info("QMP monitor on %s closed", self.spec.describe())

    # ---- binding ------------------------------------------------------------------------
    def _bind(self) -> socket.socket:
        if self.spec.kind == "unix":
            sock, self._socket_inode = bind_unix(self.spec.path)
            self.address = self.spec.path
        else:
            sock = bind_tcp(self.spec)
            bound = sock.getsockname()
            self.address = (bound[0], bound[1])
        return sock

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        if self.spec.kind == "unix" and self._socket_inode is not None:
            remove_unix_socket(self.spec.path, self._socket_inode)
            self._socket_inode = None

    # ---- cross-thread signalling --------------------------------------------------------
    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass      # the pipe is full: the I/O thread is already woken

    def _snapshot(self) -> list[_Client]:
        with self._clients_lock:
            return list(self._clients.values())

    def _on_event(self, name: str, data: dict) -> None:
        """The machine's listener: called on machine threads, never blocks, never raises."""
        try:
            line = _encode(event_message(name, data))
        except (TypeError, ValueError):
            _ratelimited.warning(("qmp-event", name), "QMP event %s has data that is not JSON", name)
            return
        for client in self._snapshot():
            if client.session.negotiated:
                client.enqueue(line)
        self._wake()

    # ---- the I/O thread -----------------------------------------------------------------
    def _io_loop(self) -> None:
        assert self._selector is not None
        sandbox.enter("qmp-io", self._sandbox)
        while not self._closing:
            self._update_interest()
            try:
                ready = self._selector.select(timeout=1.0)
            except OSError:
                if self._closing:
                    return
                raise
            for key, mask in ready:
                if key.data == "listen":
                    self._accept()
                elif key.data == "wake":
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                else:
                    client: _Client = key.data
                    try:
                        if mask & selectors.EVENT_WRITE and not client.closed:
                            self._flush(client)
                        if mask & selectors.EVENT_READ and not client.closed:
                            self._read(client)
                    except Exception:   # a kvmpy bug: lose this client, never the monitor
                        _ratelimited.log(logging.ERROR, ("qmp-io-bug",), "QMP client %s: internal "
                                         "error, dropping it", client.peer, exc_info=True)
                        self._drop(client, None)

    def _update_interest(self) -> None:
        assert self._selector is not None
        for client in self._snapshot():
            if client.overflowed:
                _ratelimited.warning(("qmp-overflow",), "QMP client %s does not read its socket: "
                                     "dropped after %d bytes queued", client.peer, self.max_output_bytes)
                self._drop(client, None)
                continue
            mask = 0
            if client.pending < self.max_pending:
                mask |= selectors.EVENT_READ
            if client.has_output():
                mask |= selectors.EVENT_WRITE
            if mask != client.mask:
                if client.mask == 0:
                    self._selector.register(client.sock, mask, client)
                elif mask == 0:
                    self._selector.unregister(client.sock)
                else:
                    self._selector.modify(client.sock, mask, client)
                client.mask = mask

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:     # EMFILE and friends: the client waits in the backlog
                _ratelimited.warning(("qmp-accept", e.errno), "QMP accept failed: %s", e)
                return
            if self.client_count >= self.max_clients:
                _ratelimited.warning(("qmp-full",), "QMP monitor %s has %d clients: refusing another",
                                     self.spec.describe(), self.max_clients)
                sock.close()
                continue
            sock.setblocking(False)
            peer = addr if isinstance(addr, str) and addr else repr(addr) if addr else "unix client"
            client = _Client(sock, str(peer), self.machine, self.max_message_bytes,
                             self.max_output_bytes)
            client.enqueue(_encode(greeting()))
            with self._clients_lock:
                self._clients[sock.fileno()] = client
            _ratelimited.debug(("qmp-connect",), "QMP client %s connected to %s", client.peer,
                               self.spec.describe())
            self._client_connected.set()

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(client, f"read failed: {e}")
            return
        if not data:
            self._drop(client, "disconnected")
            return
        for item in client.streamer.feed(data):
            with client.lock:
                inline = client.pending == 0 and _answers_at_once(item)
                if not inline:
                    client.pending += 1
            if inline:      # nothing of this client's is queued, so its replies stay in order
                self._answer(client, item)
            else:
                self._requests.put((client, item))

    def _flush(self, client: _Client) -> None:
        while True:
            with client.lock:
                if not client.out:
                    return
                head = client.out[0]
            try:
                sent = client.sock.send(head)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._drop(client, f"write failed: {e}")
                return
            with client.lock:
                if client.out and client.out[0] is head:
                    client.out_bytes -= sent
                    if sent == len(head):
                        client.out.popleft()
                    else:
                        client.out[0] = head[sent:]
                        return

    def _drop(self, client: _Client, reason: str | None) -> None:
        with client.lock:
            if client.closed:
                return
            client.closed = True
            client.out.clear()
        with self._clients_lock:
            self._clients.pop(client.sock.fileno(), None)
        if client.mask and self._selector is not None:
            try:
                self._selector.unregister(client.sock)
            except (KeyError, ValueError, OSError):
                pass
            client.mask = 0
        client.sock.close()
        if reason:
            _ratelimited.debug(("qmp-drop",), "QMP client %s: %s", client.peer, reason)

    # ---- answering -----------------------------------------------------------------------
    def _answer(self, client: _Client, item: Any) -> Any:
        """Handle one item and queue its reply; returns the action to run after it, if any."""
        try:
            reply, deferred = client.session.handle(item)
        except Exception as e:      # handle() answers everything; this is a last resort
            log.exception("QMP: handling a request failed")
            reply, deferred = error_reply(f"internal error: {type(e).__name__}: {e}"), None
        if reply is not None:
            try:
                line = _encode(reply)
            except (TypeError, ValueError) as e:
                line = _encode(error_reply(f"internal error: reply is not JSON: {e}"))
            client.enqueue(line)
        return deferred

    # ---- the dispatch thread ------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        sandbox.enter("monitor", self._sandbox)
        while True:
            work = self._requests.get()
            if work is None:
                return
            client, item = work
            if client.closed:
                continue
            with self._gate:        # a migration's switchover holds it (MachineControl.monitor_gate)
                deferred = self._answer(client, item)
            with client.lock:
                client.pending -= 1
            self._wake()
            if deferred is not None:
                deadline = time.monotonic() + 1.0     # let the answer reach the client first
                while client.has_output() and not client.closed and time.monotonic() < deadline:
                    time.sleep(0.005)
                try:
                    deferred.then()
                except Exception:
                    log.exception("QMP: the action after a reply failed")
