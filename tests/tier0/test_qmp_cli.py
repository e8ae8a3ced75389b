"""Tier 0: `kvmpy qmp` end to end against a monitor on a fake machine (the real CLI entry point,
in-process and as a subprocess), and its key=value parsing."""
import io
import json
import subprocess
import sys
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.cli.main import main
from kvmpy.cli.qmp import parse_assignments
from kvmpy.errors import ConfigError
from kvmpy.monitor.server import QmpServer
from support.fake_machine import FakeMachine


@pytest.fixture
def machine():
    m = FakeMachine()
    yield m
    m.close()


@pytest.fixture
def sock_path(tmp_path, machine):
    path = str(tmp_path / "qmp.sock")
    with QmpServer(machine, f"unix:{path},server=on,wait=off"):
        yield path


def kvmpy_qmp(capsys, *argv):
    status = main(["qmp", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def test_one_command_prints_the_reply(sock_path, capsys):
    status, out, err = kvmpy_qmp(capsys, sock_path, "query-status")
    assert status == 0 and err == ""
    assert json.loads(out) == {"return": {"status": "running", "running": True, "singlestep": False}}
    status, out, _ = kvmpy_qmp(capsys, f"unix:{sock_path}", "migrate-set-parameters", "downtime-limit=50")
    assert status == 0 and json.loads(out) == {"return": {}}
    status, out, _ = kvmpy_qmp(capsys, sock_path, "query-migrate-parameters")
    assert json.loads(out)["return"]["downtime-limit"] == 50


def test_error_reply_is_one_line_and_exit_1(sock_path, capsys):
    status, out, err = kvmpy_qmp(capsys, sock_path, "migrate-set-parameters", "downtime-limit=fast")
    assert status == 1 and out == ""
    assert err == ("kvmpy: error: QMP command migrate-set-parameters: GenericError: Invalid parameter "
                   "type for 'downtime-limit', expected: integer\n")
    status, _, err = kvmpy_qmp(capsys, sock_path, "query-status", "novalue")
    assert status == 1 and err == "kvmpy: error: argument 'novalue': expected key=value\n"


def test_missing_socket_is_one_line(tmp_path, capsys):
    status, out, err = kvmpy_qmp(capsys, str(tmp_path / "none.sock"), "query-status")
    assert status == 1 and out == "" and err.count("\n") == 1
    assert "connecting to the QMP monitor" in err and "No such file or directory" in err


def test_hmp_shortcut(sock_path, capsys):
    status, out, _ = kvmpy_qmp(capsys, sock_path, "hmp", "info", "status")
    assert status == 0 and out == "VM status: running\n"


def test_events_follow(sock_path, machine, capsys):
    def emit_later():
        import time
        time.sleep(0.2)
        machine.emit("POWERDOWN")
        machine.emit("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"})
    t = threading.Thread(target=emit_later)
    t.start()
    status, out, _ = kvmpy_qmp(capsys, sock_path, "events", "--count", "2")
    t.join()
    events = [json.loads(line) for line in out.splitlines()]
    assert status == 0 and [e["event"] for e in events] == ["POWERDOWN", "SHUTDOWN"]
    assert all("timestamp" in e for e in events)


def test_events_end_when_the_vm_quits(tmp_path, machine, capsys):
    path = str(tmp_path / "q.sock")
    server = QmpServer(machine, f"unix:{path},server=on,wait=off").start()

    def quit_later():
        import time
        time.sleep(0.2)
        machine.stop()                       # emits SHUTDOWN, then the VMM closes its monitor
        server.close()
    t = threading.Thread(target=quit_later)
    t.start()
    status, out, err = kvmpy_qmp(capsys, path, "events")
    t.join()
    assert status == 0 and err == ""
    assert [json.loads(line)["event"] for line in out.splitlines()] == ["SHUTDOWN"]


def test_migrate_waits_for_the_end_and_prints_statistics(sock_path, machine, capsys):
    timer = threading.Timer(0.3, machine.finish_migration)
    timer.start()
    status, out, err = kvmpy_qmp(capsys, sock_path, "migrate", "uri=file:/tmp/vm.snap", "--interval", "0.05")
    timer.join()
    assert status == 0 and err == ""
    assert "status: completed" in out and "downtime: 12 ms" in out and "transferred: 4.0 KiB" in out
    assert "\r" not in out          # no progress bar when stdout is not a terminal
    assert "migrate file:/tmp/vm.snap" in machine.calls


def test_migrate_failure_exits_1(sock_path, machine, capsys):
    def fail():
        machine._migration["status"] = "failed"
        machine._migration["error-desc"] = "disk full"
    timer = threading.Timer(0.1, fail)
    timer.start()
    status, out, err = kvmpy_qmp(capsys, sock_path, "migrate", "uri=exec:cat > /dev/null", "--interval", "0.05")
    timer.join()
    assert status == 1 and "status: failed" in out and err == "kvmpy: error: migration disk full\n"


def test_migrate_shows_a_progress_bar_on_a_terminal(sock_path, machine):
    """tqdm draws on a terminal-like stream; the statistics follow."""
    class Tty(io.StringIO):
        def isatty(self):
            return True
    from kvmpy.cli import qmp as cli
    from kvmpy.monitor.client import QmpClient
    out = Tty()
    timer = threading.Timer(0.3, machine.finish_migration)
    timer.start()
    with QmpClient(sock_path) as client:
        assert cli._migrate(client, {"uri": "file:/tmp/vm.snap"}, 0.05, out) == 0
    timer.join()
    text = out.getvalue()
    assert "migrate" in text and "\r" in text and "status: completed" in text


def test_as_a_subprocess(sock_path):
    done = subprocess.run([sys.executable, "-m", "kvmpy", "qmp", sock_path, "query-kvm"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"return": {"enabled": True, "present": True}}


def test_assignments():
    assert parse_assignments(["uri=file:/x", "n=3", "b=true", "l=[1,2]", "s=\"3\"", "a.b.c=1", "a.d=x"]) == {
        "uri": "file:/x", "n": 3, "b": True, "l": [1, 2], "s": "3", "a": {"b": {"c": 1}, "d": "x"}}
    assert parse_assignments(["command-line=info registers -a"]) == {"command-line": "info registers -a"}
    for bad in (["x"], ["=1"], ["a=1", "a=2"], ["a=1", "a.b=2"]):
        with pytest.raises(ConfigError):
            parse_assignments(bad)


@given(st.dictionaries(st.from_regex(r"[a-z][a-z0-9-]{0,10}", fullmatch=True),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=20), max_size=5))
def test_assignments_round_trip_json_values(values):
    words = [f"{k}={json.dumps(v)}" for k, v in values.items()]
    assert parse_assignments(words) == values
