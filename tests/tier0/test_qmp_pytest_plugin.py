"""Tier 0: the pytest plugin without KVM: it registers (entry point, marker, options), the marker
skips for facts outside kvmpy only, the `kvm_machine` factory builds, starts and tears down what
`kvmpy.Machine` returns (a fake here), and a failing test gets the console and state report."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE_CONFTEST = '''
import re, threading, pytest, kvmpy

class FakeConsole:
    text = "fake guest says hello\\n"
    def expect(self, pattern, timeout=1.0):
        m = re.search(pattern, self.text)
        assert m, "no match"
        return m

class FakeBoard:
    def write_report(self, out, boots):
        out.write(f"fake state report, boot {boots}\\n")

class FakeApiMachine:
    made = []
    def __init__(self, **kwargs):
        self.kwargs, self.status, self.events = kwargs, "prelaunch", []
        self.console, self.board, self.boots, self.name = FakeConsole(), FakeBoard(), 1, None
        self._ended = threading.Event()
        self._listeners = []
        FakeApiMachine.made.append(self)
    def add_listener(self, fn): self._listeners.append(fn)
    def remove_listener(self, fn): self._listeners.remove(fn)
    def start(self, paused=None): self.events.append("start"); self.status = "running"
    def pause(self): self.status = "paused"
    def resume(self): self.status = "running"
    def stop(self): self.events.append("stop"); self.status = "shutdown"; self._ended.set()
    def wait(self, timeout=None): return "ended" if self._ended.wait(timeout) else None
    def close(self): self.events.append("close")

@pytest.fixture(autouse=True)
def fake_machine(monkeypatch):
    monkeypatch.setattr(kvmpy, "Machine", FakeApiMachine, raising=False)
    FakeApiMachine.made.clear()
    yield FakeApiMachine
    # runs after kvm_machine's teardown: every machine was stopped, waited for and closed
    for m in FakeApiMachine.made:
        assert m.events[-2:] == ["stop", "close"], m.events
'''

INNER_TESTS = '''
import pytest

@pytest.mark.kvm
def test_factory_builds_starts_and_talks_qmp(kvm_machine, fake_machine):
    vm = kvm_machine(kernel="bzImage", memory="64M", append="console=ttyS0", qmp=True)
    assert vm.kwargs["kernel"] == "bzImage" and vm.kwargs["memory"] == "64M"
    assert vm.status == "running" and vm.events == ["start"]
    assert vm.console.expect(r"hello").group(0) == "hello"
    assert vm.qmp.execute("query-status")["status"] == "running"
    vm.qmp.execute("stop")
    assert vm.status == "paused"

def test_start_false_stays_in_prelaunch(kvm_machine, fake_machine):
    vm = kvm_machine(kernel="k", start=False)
    assert vm.status == "prelaunch" and vm.events == []

def test_failure_attaches_console_and_report(kvm_machine):
    kvm_machine(kernel="k")
    assert False, "deliberate"
'''


def run_inner(tmp_path, *args, tests=INNER_TESTS, conftest=FAKE_CONFTEST):
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(tests))
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "kvmpy.pytest_plugin", "-rs", "-q",
                           "-p", "no:cacheprovider", *args, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


def test_entry_point_is_declared_and_installed():
    """pytest loads the plugin by itself once kvmpy is installed (make venv; CI installs fresh)."""
    from importlib.metadata import entry_points
    setup = (ROOT / "setup.py").read_text()
    assert '"pytest11": ["kvmpy=kvmpy.pytest_plugin"]' in setup
    installed = {e.name: e.value for e in entry_points(group="pytest11")}
    assert installed.get("kvmpy") == "kvmpy.pytest_plugin", \
        "kvmpy's pytest11 entry point is not installed: rerun make venv (pip install -e '.[test]')"


def test_factory_teardown_and_failure_report(tmp_path):
    fake_kvm = tmp_path / "fake-kvm"
    fake_kvm.write_bytes(b"")
    done = run_inner(tmp_path, "--kvm-device", str(fake_kvm))
    out = done.stdout
    assert "1 failed, 2 passed" in out and "error" not in out.splitlines()[-1], out + done.stderr
    assert "kvmpy console (machine 1)" in out and "fake guest says hello" in out
    assert "kvmpy state report (machine 1)" in out and "fake state report, boot 1" in out
    assert "deliberate" in out


def test_marker_and_factory_skip_only_for_missing_kvm(tmp_path):
    done = run_inner(tmp_path, "--kvm-device", str(tmp_path / "no-such-kvm"),
                     tests='''
import pytest

@pytest.mark.kvm
def test_marked():
    raise AssertionError("must not run")

def test_factory_skips(kvm_machine):
    kvm_machine(kernel="k")
    raise AssertionError("must not run")
''')
    out = done.stdout
    assert "2 skipped" in out, out + done.stderr
    assert out.count("no-such-kvm on this host") == 2 and "make nested-run" in out


def test_kvmpy_failing_is_a_failure_not_a_skip(tmp_path):
    """A kvmpy error while building the machine fails the test."""
    fake_kvm = tmp_path / "fake-kvm"
    fake_kvm.write_bytes(b"")
    conftest = FAKE_CONFTEST.replace('FakeApiMachine.made.append(self)',
                                     'raise kvmpy.errors.ConfigError("booting", detail="broken")')
    conftest = "import kvmpy.errors\n" + conftest
    done = run_inner(tmp_path, "--kvm-device", str(fake_kvm), conftest=conftest, tests='''
def test_boot(kvm_machine):
    kvm_machine(kernel="k")
''')
    assert "1 failed" in done.stdout and "booting: broken" in done.stdout, done.stdout + done.stderr
