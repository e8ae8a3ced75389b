"""Tier 1: the pytest plugin and the QMP monitor on a real kvmpy.Machine (the tiny counter guest):
an inner pytest run boots it through `kvm_machine`, drives it with the `qemu.qmp` library from
PyPI (query-status through prelaunch/running/paused/shutdown, stop/cont stop and resume the
guest's progress, quit), and a deliberately failing test gets the console and state report."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COUNTER = ROOT / "tests" / "guest" / "out" / "counter.elf"

INNER = '''
import re
import time

import pytest

COUNTER = {counter!r}


def ticks(vm):
    return len(re.findall(r"tick [0-9a-f]{{8}}", vm.console.text))


@pytest.mark.kvm
def test_qemu_qmp_drives_the_guest(kvm_machine):
    from qemu.qmp.legacy import QEMUMonitorProtocol
    vm = kvm_machine(kernel=COUNTER, memory="64M", qmp=True, start=False)
    qmp = QEMUMonitorProtocol(vm.qmp_path)
    qmp.connect(negotiate=True)
    try:
        assert qmp.cmd("query-status")["status"] == "prelaunch"
        qmp.cmd("cont")
        vm.console.expect(r"tick 00000002", timeout=60)
        assert qmp.cmd("query-status") == {{"status": "running", "running": True, "singlestep": False}}
        qmp.cmd("stop")
        assert qmp.cmd("query-status")["status"] == "paused"
        events = [e["event"] for e in qmp.get_events(wait=2.0)]
        assert "STOP" in events
        frozen = ticks(vm)
        time.sleep(1.0)
        assert ticks(vm) == frozen, "the guest printed while paused"
        qmp.cmd("cont")
        vm.console.expect(r"tick [0-9a-f]{{8}}", timeout=60)
        assert ticks(vm) > frozen
        assert qmp.cmd("query-status")["status"] == "running"
        qmp.cmd("quit")
        deadline = time.monotonic() + 10
        while vm.status != "shutdown" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert vm.status == "shutdown"
    finally:
        qmp.close()


@pytest.mark.kvm
def test_kvmpy_client_and_failure_report(kvm_machine):
    vm = kvm_machine(kernel=COUNTER, memory="64M", qmp=True)
    vm.console.expect(r"tick 00000001", timeout=60)
    assert vm.qmp.execute("human-monitor-command", {{"command-line": "info status"}}) == "VM status: running\\r\\n"
    assert False, "deliberate failure"
'''


@pytest.fixture
def counter_elf(kvm_available) -> str:
    if not COUNTER.exists():
        pytest.fail(f"{COUNTER} is not built: run make (tests/guest)")
    return str(COUNTER)


def test_plugin_boots_and_drives_a_guest(counter_elf, tmp_path):
    pytest.importorskip("qemu.qmp", reason="qemu.qmp is a test extra: pip install -e '.[test]'")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(INNER.format(counter=counter_elf)))
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmpy.pytest_plugin", "-q",
                           "-p", "no:cacheprovider", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=tmp_path, env=env)
    out = done.stdout + done.stderr
    assert "1 failed, 1 passed" in out, out
    assert "deliberate failure" in out
    assert "kvmpy console (machine 1)" in out and "counter guest" in out
    assert "kvmpy state report (machine 1)" in out and "kvmpy: state report" in out
