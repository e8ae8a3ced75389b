"""Tier 0: the QMP server over real sockets, against a fake machine: a hand-written client, the
`qemu.qmp` library from PyPI, events, and hostile clients (garbage, 16 MiB lines, a client that
never reads while events flood, a hundred clients at once, a second server on the same path)."""
import json
import os
import socket
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmpy.errors import ConfigError
from kvmpy.monitor import start_monitors, wait_for_clients
from kvmpy.monitor.client import MonitorError, QmpClient, QmpCommandError
from kvmpy.monitor.server import QmpServer
from kvmpy.monitor.spec import parse_qmp_spec, parse_server_spec
from support.fake_machine import FakeMachine


@pytest.fixture
def machine():
    m = FakeMachine()
    yield m
    m.close()


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "qmp.sock")


@pytest.fixture
def server(machine, sock_path):
    s = QmpServer(machine, f"unix:{sock_path},server=on,wait=off").start()
    yield s
    s.close()


class RawClient:
    """A hand-written QMP client: bytes in, JSON lines out."""

    def __init__(self, path, timeout=5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def send(self, data):
        self.sock.sendall(data if isinstance(data, bytes) else json.dumps(data).encode() + b"\n")

    def recv(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        assert line.endswith(b"\r"), "QMP lines end in CRLF"
        return json.loads(line)

    def close(self):
        self.sock.close()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def test_greeting_negotiation_commands_and_id(server, sock_path):
    c = RawClient(sock_path)
    assert "QMP" in c.recv()
    c.send({"execute": "query-status", "id": 1})
    assert c.recv()["error"] == {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    c.send(b'{"execute": "qmp_capabilities"}{"execute": "query-status", "id": "two"}')
    assert c.recv() == {"return": {}}
    assert c.recv() == {"return": {"status": "running", "running": True, "singlestep": False}, "id": "two"}
    c.close()


def test_queued_commands_wait_for_the_monitor_gate_and_quick_queries_do_not(server, sock_path, machine):
    """A migration's switchover holds the machine's monitor_gate (QEMU's stop-and-copy holds the
    BQL): a queued command (query-migrate) is answered once it is released; query-status, which
    the I/O thread answers at once, is not held up."""
    c = RawClient(sock_path)
    c.recv()
    c.send({"execute": "qmp_capabilities"})
    assert c.recv() == {"return": {}}
    with machine.monitor_gate:
        c.send({"execute": "query-migrate", "id": "held"})
        c.sock.settimeout(0.3)
        with pytest.raises(socket.timeout):
            c.recv()
        c.sock.settimeout(5.0)
    assert c.recv() == {"return": {}, "id": "held"}
    with machine.monitor_gate:
        c.send({"execute": "query-status", "id": "now"})
        assert c.recv()["id"] == "now"
    c.close()


def test_events_reach_negotiated_clients_with_timestamps(server, sock_path, machine):
    early = RawClient(sock_path)
    early.recv()                                    # greeting, but never negotiates
    c = RawClient(sock_path)
    c.recv()
    c.send({"execute": "qmp_capabilities"})
    c.recv()
    before = time.time()
    threading.Thread(target=machine.emit, args=("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})).start()
    event = c.recv()
    assert event["event"] == "SHUTDOWN" and event["data"] == {"guest": True, "reason": "guest-shutdown"}
    stamp = event["timestamp"]["seconds"] + event["timestamp"]["microseconds"] / 1e6
    assert before - 1 <= stamp <= time.time() + 1
    c.send({"execute": "stop", "id": 5})
    got = [c.recv(), c.recv()]                      # STOP event and the reply, in either order
    assert {"return": {}, "id": 5} in got and any(m.get("event") == "STOP" for m in got)
    early.send({"execute": "qmp_capabilities"})
    assert early.recv() == {"return": {}}           # no events were queued before negotiation
    c.close()
    early.close()


def test_qemu_qmp_library_drives_the_monitor(server, sock_path, machine):
    legacy = pytest.importorskip("qemu.qmp.legacy", reason="qemu.qmp is a test extra (pip install -e '.[test]')")
    qmp = legacy.QEMUMonitorProtocol(sock_path)
    greeting = qmp.connect(negotiate=True)
    assert greeting["QMP"]["version"]["package"].startswith("kvmpy")
    assert qmp.cmd("query-status")["status"] == "running"
    progress = machine.progress
    qmp.cmd("stop")
    assert qmp.pull_event(wait=2.0)["event"] == "STOP"
    frozen = machine.progress
    time.sleep(0.05)
    assert machine.progress == frozen > progress - 1
    assert qmp.cmd("query-status")["status"] == "paused"
    qmp.cmd("cont")
    assert qmp.pull_event(wait=2.0)["event"] == "RESUME"
    deadline = time.monotonic() + 2
    while machine.progress == frozen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert machine.progress > frozen
    reply = qmp.cmd_raw("human-monitor-command", {"command-line": "info status"})
    assert reply["return"] == "VM status: running\r\n"
    with pytest.raises(Exception) as err:
        qmp.cmd("no-such-command")
    assert "has not been found" in str(err.value)
    qmp.cmd("quit")
    assert qmp.pull_event(wait=2.0)["event"] == "SHUTDOWN"
    qmp.close()
    assert machine.status == "shutdown"


def test_garbage_huge_lines_and_bad_utf8_get_errors_and_the_session_goes_on(server, sock_path, machine):
    c = RawClient(sock_path, timeout=20)
    c.recv()
    c.send({"execute": "qmp_capabilities"})
    c.recv()
    c.send(b"\x00\x01garbage \xff\xfe\n")
    assert c.recv()["error"]["class"] == "GenericError"
    c.send(b'{"execute": "query-kvm", "arguments": {"a": "\xc3\x28"}}\n')
    assert c.recv()["error"]["desc"] == "JSON parse error, invalid UTF-8 sequence in string"
    huge = b'{"execute": "human-monitor-command", "arguments": {"command-line": "' + b"A" * (16 << 20) + b'"}}\n'
    sender = threading.Thread(target=c.send, args=(huge,))
    sender.start()
    assert c.recv()["error"]["desc"] == "JSON token size limit exceeded"
    sender.join()
    c.send({"execute": "query-status", "id": "after"})
    while True:
        reply = c.recv()
        if reply.get("id") == "after":
            break
        assert "error" in reply                    # whatever the tail of the huge line caused
    assert reply["return"]["status"] == "running"
    c.close()


def test_a_client_that_never_reads_is_dropped_and_nobody_else_notices(machine, sock_path):
    with QmpServer(machine, f"unix:{sock_path},server=on,wait=off", max_output_bytes=256 << 10) as server:
        stuck = RawClient(sock_path)
        stuck.send({"execute": "qmp_capabilities"})
        stuck.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader = RawClient(sock_path)
        reader.recv()
        reader.send({"execute": "qmp_capabilities"})
        assert reader.recv() == {"return": {}}
        seen = []

        def drain():
            try:
                while True:
                    seen.append(reader.recv())
            except (EOFError, OSError):
                pass
        drainer = threading.Thread(target=drain)
        drainer.start()
        deadline = time.monotonic() + 10
        slowest = 0.0
        emitted = 0
        while server.client_count > 1 and time.monotonic() < deadline:
            # The reader stays within a burst of what was emitted, as a client that reads does:
            # its queue stays far below the limit however slow this host is (a CI run at a
            # third of the usual speed once starved the drainer until it too was dropped),
            # while the stuck client's queue only grows.
            while len(seen) < emitted - 200 and time.monotonic() < deadline:
                time.sleep(0.001)
            t0 = time.monotonic()
            for _ in range(200):
                machine.emit("MIGRATION_PASS", {"pass": 1})
            slowest = max(slowest, time.monotonic() - t0)
            emitted += 200
            time.sleep(0.001)
        assert server.client_count == 1, "the stuck client was not dropped"
        assert slowest < 1.0, f"emitting 200 events took {slowest:.3f}s: the machine was blocked"
        progress = machine.progress
        with QmpClient(sock_path) as late:
            assert late.execute("query-status")["status"] == "running"
        time.sleep(0.02)
        assert machine.progress > progress
        assert len(seen) > 100 and all(m["event"] == "MIGRATION_PASS" for m in seen)
        reader.sock.shutdown(socket.SHUT_RDWR)
        drainer.join()
        reader.close()
        stuck.close()


def test_a_hundred_clients_at_once_and_nothing_leaks(machine, sock_path):
    fds, threads = open_fds(), threading.active_count()
    with QmpServer(machine, f"unix:{sock_path},server=on,wait=off", max_clients=64) as server:
        clients = []
        for _ in range(100):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            s.connect(sock_path)
            clients.append(s)
        greeted = refused = 0
        for s in clients:
            data = s.recv(65536)
            if data:
                assert json.loads(data.split(b"\n")[0])["QMP"]
                greeted += 1
            else:
                refused += 1                        # a clean close, never a hang
        assert greeted == 64 and refused == 36
        half = clients[:32]
        for s in half:                              # disconnect mid-command
            s.sendall(b'{"execute": "qmp_capabilities"}{"execute": "query-sta')
            s.close()
        for s in clients[32:]:
            s.close()
        with QmpClient(sock_path) as c:
            assert c.execute("query-kvm")["enabled"] is True
        deadline = time.monotonic() + 5
        while server.client_count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.client_count == 0
    assert not os.path.exists(sock_path) and machine.listener_count == 0
    assert open_fds() == fds and threading.active_count() == threads


def test_socket_path_rules(machine, sock_path, tmp_path):
    with QmpServer(machine, f"unix:{sock_path},server=on,wait=off"):
        with pytest.raises(ConfigError, match="another monitor is listening there"):
            QmpServer(machine, f"unix:{sock_path},server=on,wait=off").start()
        assert os.path.exists(sock_path)
    assert not os.path.exists(sock_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("data")
    with pytest.raises(ConfigError, match="not a socket"):
        QmpServer(machine, f"unix:{precious},server=on,wait=off").start()
    assert precious.read_text() == "data"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)
    stale.close()                                   # a leftover socket file nobody listens on
    with QmpServer(machine, f"unix:{sock_path},server=on,wait=off"):
        with QmpClient(sock_path) as c:
            assert c.execute("query-name") == {"name": "fake"}
    with pytest.raises(ConfigError, match="No such file or directory"):
        QmpServer(machine, f"unix:{tmp_path}/missing/dir/q.sock,server=on,wait=off").start()
    assert machine.listener_count == 0


def test_tcp_and_wait_on(machine):
    servers = start_monitors(machine, ["tcp:127.0.0.1:0,server=on,wait=on"])
    try:
        server = servers[0]
        host, port = server.address
        assert not wait_for_clients(servers, timeout=0.05)
        holder = {}
        waiter = threading.Thread(target=lambda: holder.setdefault("ok", wait_for_clients(servers, timeout=5)))
        waiter.start()
        with QmpClient(f"tcp:{host}:{port}") as c:
            waiter.join()
            assert holder["ok"] is True
            with pytest.raises(QmpCommandError) as err:
                c.execute("cont", {"bogus": 1})
            assert err.value.error_class == "GenericError" and err.value.desc == "Parameter 'bogus' is unexpected"
    finally:
        for s in servers:
            s.close()


def test_client_errors_are_one_line(tmp_path):
    with pytest.raises(MonitorError, match="connecting to the QMP monitor unix:.*No such file"):
        QmpClient(str(tmp_path / "none.sock")).connect()
    not_qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = str(tmp_path / "other.sock")
    not_qmp.bind(path)
    not_qmp.listen(1)

    def answer():
        conn, _ = not_qmp.accept()
        conn.sendall(b'{"hello": 1}\n')
        conn.close()
    t = threading.Thread(target=answer)
    t.start()
    with pytest.raises(MonitorError, match="no QMP greeting"):
        QmpClient(path).connect()
    t.join()
    not_qmp.close()


@pytest.mark.parametrize("spec, message", [
    ("unix:/tmp/x,server=maybe", "Parameter 'server' expects 'on' or 'off'"),
    ("unix:/tmp/x,server=on,color=red", "Invalid parameter 'color'"),
    ("tcp:localhost,server=on", "error parsing address 'localhost'"),
    ("tcp:localhost:99999,server=on", "port '99999' is not a valid port number"),
    ("serial:/dev/ttyS0,server=on", "'serial' is not a valid char driver name"),
    ("unix:/tmp/x", "kvmpy's monitor only listens: add server=on"),
    ("unix:" + "a" * 120 + ",server=on", "is too long"),
])
def test_spec_errors(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        parse_server_spec(spec)
    assert "\n" not in str(err.value)


def test_spec_forms():
    assert parse_server_spec("unix:/run/q.sock,server=on,wait=off").wait is False
    assert parse_server_spec("unix:/run/q.sock,server,nowait").wait is False
    assert parse_server_spec("tcp::4444,server=on").port == 4444
    assert parse_server_spec("tcp:[::1]:4444,server=on,wait=on").host == "::1"
    assert parse_qmp_spec("/run/q.sock").path == "/run/q.sock"


def test_serve_monitors_waits_for_wait_on_and_cleans_up(machine, tmp_path):
    from kvmpy.monitor import serve_monitors
    held, free = str(tmp_path / "held.sock"), str(tmp_path / "free.sock")
    entered = threading.Event()

    def vmm():
        with serve_monitors(machine, [f"unix:{held},server=on,wait=on", f"unix:{free},server=on,wait=off"]):
            entered.set()
            time.sleep(0.1)
    t = threading.Thread(target=vmm)
    t.start()
    deadline = time.monotonic() + 5
    while not os.path.exists(held) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not entered.wait(0.2), "the guest started before a client connected to a wait=on monitor"
    with QmpClient(held):
        assert entered.wait(5)
    t.join()
    assert not os.path.exists(held) and not os.path.exists(free) and machine.listener_count == 0
    with pytest.raises(ConfigError, match="Invalid parameter 'bogus'"):
        with serve_monitors(machine, [f"unix:{held},server=on,wait=off", "unix:/x,server=on,bogus=1"]):
            pass
    assert not os.path.exists(held)


@given(st.lists(st.binary(min_size=1, max_size=2000), min_size=1, max_size=6))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_bytes_over_the_socket_never_break_the_monitor(server, sock_path, machine, chunks):
    errors = []
    old_hook = threading.excepthook
    threading.excepthook = lambda args: errors.append(args)
    try:
        c = RawClient(sock_path, timeout=5)
        c.recv()
        for chunk in chunks:
            c.send(chunk)
        c.send(b'\x04\n{"execute": "qmp_capabilities", "id": "sync"}\n{"execute": "query-kvm", "id": "sync2"}\n')
        replies = []
        while not replies or replies[-1].get("id") != "sync2":
            replies.append(c.recv())
        assert replies[-1] == {"return": {"enabled": True, "present": True}, "id": "sync2"} or \
            replies[-1]["error"]["class"] == "CommandNotFound"      # if the garbage held no negotiation
        c.close()
    finally:
        threading.excepthook = old_hook
    assert not errors
    with QmpClient(sock_path) as other:
        assert other.execute("query-status")["status"] == machine.status


def test_a_slow_command_blocks_neither_greetings_nor_events_and_its_client_may_leave(machine, server, sock_path):
    release, entered = threading.Event(), threading.Event()
    real_pause = machine.pause

    def slow_pause():
        entered.set()
        release.wait(5)                           # a pause() waiting for vCPUs to park
        real_pause()
    machine.pause = slow_pause
    leaver = RawClient(sock_path)
    leaver.recv()
    leaver.send(b'{"execute": "qmp_capabilities"}\n{"execute": "stop"}\n')
    assert leaver.recv() == {"return": {}}
    assert entered.wait(5)
    leaver.close()                                # gone while its command runs (a command still
                                                  # queued when its client leaves is dropped, as in QEMU)
    t0 = time.monotonic()
    with QmpClient(sock_path, timeout=5) as other:   # greeted and negotiated meanwhile
        assert other.execute("query-status")["status"] == "running"
        machine.emit("POWERDOWN")
        assert other.next_event(timeout=2)["event"] == "POWERDOWN"
        assert time.monotonic() - t0 < 2, "another client's slow command held this one up"
        release.set()
        assert other.wait_event("STOP", timeout=5)
        assert other.execute("query-status")["status"] == "paused"
    deadline = time.monotonic() + 5
    while server.client_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.client_count == 0
