"""kvmpy's pytest plugin (entry point `pytest11: kvmpy`): boot a guest inside a test in two lines.

    @pytest.mark.kvm
    def test_boots(kvm_machine):
        vm = kvm_machine(kernel="bzImage", initrd="initrd.img", append="console=ttyS0", qmp=True)
        vm.console.expect(r"login:", timeout=60)
        assert vm.qmp.execute("query-status")["status"] == "running"

- `kvm_machine(**kwargs)` builds `kvmpy.Machine(**kwargs)` (kernel, initrd, append, memory, smp,
  drives, rng, timeout, ...), starts it (start=False keeps it in prelaunch) and returns a handle
  that is the machine plus `.qmp` (a connected kvmpy.monitor.client.QmpClient, with qmp=True)
  and `.qmp_path`. Teardown stops, waits for and closes every machine the test made, and the
  monitor with it, whatever the test did.
- On a failing test, each machine's console output and kvmpy's state report are attached to the
  test report (shown with the failure).
- `@pytest.mark.kvm` skips where no usable KVM exists; `@pytest.mark.kvm(hardware=True)` also
  skips on PVM hosts, where a stock kernel cannot boot. Skips are decided from facts outside
  kvmpy only (the device node, os.access, the host's KVM kind); if kvmpy itself fails, the test
  fails. The skip reason names the nested harness that runs such tests anyway.

Nothing heavy is imported when pytest loads the plugin: kvmpy's machine and monitor are imported
by the fixture, so test suites that never boot a guest pay nothing.
"""
from __future__ import annotations

import os
import tempfile
import threading
from typing import Any, Callable

import pytest

MACHINES_KEY = pytest.StashKey[list]()
HARNESS_HINT = ("kvmpy's nested harness runs KVM tests inside an L1 guest with hardware-style KVM: "
                "make nested-run CMD='python -m pytest ...' (see kvmpy's README)")
CONSOLE_TAIL = 64 << 10


def kvm_unusable_reason(device: str = "/dev/kvm", hardware: bool = False) -> str | None:
    """Why KVM cannot be used here (None if it can), from facts outside kvmpy."""
    if not os.path.exists(device):
        return f"no {device} on this host; {HARNESS_HINT}"
    if not os.access(device, os.R_OK | os.W_OK):
        return f"no read/write permission on {device} (uid {os.getuid()}; join the kvm group); {HARNESS_HINT}"
    if hardware:
        from kvmpy.cli.info import host_kvm_kind
        if host_kvm_kind(device) == "pvm":
            return (f"{device} is PVM (software nested KVM), which cannot boot a stock kernel; "
                    f"{HARNESS_HINT}")
    return None


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvmpy", "kvmpy guests")
    group.addoption("--kvm-device", default="/dev/kvm", help="KVM device for kvm_machine (default /dev/kvm)")
    group.addoption("--kvm-stop-timeout", type=float, default=10.0,
                    help="seconds teardown waits for a guest to end after stopping it")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "kvm(hardware=False): needs a usable /dev/kvm (hardware=True: "
                                       "not PVM); skipped with the reason where there is none")


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("kvm")
    if marker is not None:
        reason = kvm_unusable_reason(item.config.getoption("kvm_device"),
                                     bool(marker.kwargs.get("hardware", False)))
        if reason is not None:
            pytest.skip(reason)


class KvmMachine:
    """A booted kvmpy.Machine with test conveniences: every attribute not defined here is the
    machine's own (console, status, pause(), ...); `qmp` is a QmpClient when asked for."""

    def __init__(self, machine: Any, label: str):
        self.machine = machine
        self.label = label
        self.qmp: Any = None
        self.qmp_path: str | None = None
        self._server: Any = None
        self._socket_dir: str | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.machine, name)

    def console_text(self) -> str:
        console = getattr(self.machine, "console", None)
        if console is None:
            return "(the console is not captured)"
        text = console.text
        return text if len(text) <= CONSOLE_TAIL else "...\n" + text[-CONSOLE_TAIL:]

    def state_report(self) -> str:
        """kvmpy's state report (vCPU registers, interrupt controllers, Python stacks), as text."""
        import io
        out = io.StringIO()
        board = getattr(self.machine, "board", None)
        if board is None or not hasattr(board, "write_report"):
            return f"(no running board; machine status {getattr(self.machine, 'status', '?')})"
        try:
            board.write_report(out, getattr(self.machine, "boots", 0))
        except Exception as e:   # a report is a diagnostic: its failure must not hide the test's
            out.write(f"\n(the state report failed: {type(e).__name__}: {e})\n")
        return out.getvalue()

    def start_monitor(self) -> None:
        from kvmpy.monitor.client import QmpClient
        from kvmpy.monitor.server import QmpServer
        self._socket_dir = tempfile.mkdtemp(prefix="kvmpy-qmp-")
        self.qmp_path = os.path.join(self._socket_dir, "qmp.sock")
        self._server = QmpServer(self.machine, f"unix:{self.qmp_path},server=on,wait=off").start()
        self.qmp = QmpClient(self.qmp_path)
        self.qmp.connect()

    def teardown(self, stop_timeout: float) -> list[str]:
        """End everything this handle owns; returns what did not go cleanly (for the report)."""
        problems: list[str] = []
        if self.qmp is not None:
            self.qmp.close()
        if self._server is not None:
            self._server.close()
        try:
            self.machine.stop()
            if self.machine.wait(stop_timeout) is None:
                problems.append(f"{self.label} did not end within {stop_timeout:g} s of stop()")
        finally:
            self.machine.close()
            if self._socket_dir is not None:
                try:
                    os.rmdir(self._socket_dir)
                except OSError:
                    pass
        return problems


KVMPY_THREAD_PREFIXES = ("kvmpy", "vcpu", "qmp-")     # + console backends: "<Class>Console-in/out"


def _kvmpy_threads_left(before: set, grace_s: float = 2.0) -> list[str]:
    """kvmpy's threads started during the test and still alive `grace_s` after teardown."""
    import time
    deadline = time.monotonic() + grace_s
    while True:
        left = [t.name for t in threading.enumerate()
                if t not in before and t.is_alive()
                and (t.name.startswith(KVMPY_THREAD_PREFIXES) or "Console-" in t.name)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)


@pytest.fixture
def kvm_machine(request: pytest.FixtureRequest) -> Callable[..., KvmMachine]:
    """Factory: `kvm_machine(kernel=..., initrd=None, append="", memory="512M", smp=1,
    drives=[...], rng=False, timeout=..., qmp=False, start=True)` -> a started KvmMachine."""
    device = request.config.getoption("kvm_device")
    stop_timeout = request.config.getoption("kvm_stop_timeout")
    handles: list[KvmMachine] = []
    request.node.stash[MACHINES_KEY] = handles
    threads_before = set(threading.enumerate())

    def make(*, qmp: bool = False, start: bool = True, **kwargs: Any) -> KvmMachine:
        reason = kvm_unusable_reason(kwargs.get("device", device))
        if reason is not None:
            pytest.skip(reason)
        kwargs.setdefault("device", device)
        import kvmpy
        machine = kvmpy.Machine(**kwargs)
        handle = KvmMachine(machine, f"machine {len(handles) + 1}")
        handles.append(handle)
        if qmp:
            handle.start_monitor()
        if start:
            machine.start()
        return handle

    yield make
    problems: list[str] = []
    for handle in reversed(handles):
        problems += handle.teardown(stop_timeout)
    leftover = _kvmpy_threads_left(threads_before) if handles else []
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
    if leftover:
        pytest.fail(f"threads left running after teardown: {leftover}", pytrace=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    """Attach each machine's console and state report to a failing test's report, while the
    machines still exist (teardown comes after the call report)."""
    outcome = yield
    report = outcome.get_result()
    if report.when not in ("setup", "call") or not report.failed:
        return
    for handle in item.stash.get(MACHINES_KEY, []):
        report.sections.append((f"kvmpy console ({handle.label})", handle.console_text()))
        report.sections.append((f"kvmpy state report ({handle.label})", handle.state_report()))
