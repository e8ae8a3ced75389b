"""Tier 0: the harness's supervision (markers, timeouts, process-group kill), the guest runner
and the tier-2 mode decision, driven by fake VMMs (sh scripts) instead of QEMU."""
from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import pytest

from kvmpy.errors import NestedError
from kvmpy.nested import cli, tier2
from kvmpy.nested.harness import HarnessConfig, L1Harness


def fake_harness(**overrides) -> L1Harness:
    """An L1Harness without the kernel/initramfs setup: only _supervise is exercised."""
    h = object.__new__(L1Harness)
    overrides.setdefault("diagnosis_wait_s", 0.5)
    h.config = HarnessConfig(**overrides)
    return h


def supervise(tmp_path: Path, script: str, **overrides):
    out = io.BytesIO()
    log = tmp_path / "console.log"
    with log.open("wb") as logf:
        result = fake_harness(**overrides)._supervise(["sh", "-c", script], logf, out,
                                                      tmp_path, log)
    return result, out.getvalue().decode()


def test_supervise_streams_only_the_command_output_and_returns_its_status(tmp_path):
    result, out = supervise(tmp_path, "echo 'KVMPY-L1-INIT uptime=1'; echo kernel-noise; "
                            "echo 'KVMPY-L1-READY uptime=2'; printf 'hello\\r\\n'; "
                            "echo KVMPY-L1-RC=3; echo after")
    assert result.rc == 3 and out == "hello\n"
    assert result.init_s is not None and result.ready_s is not None
    assert result.command_s is not None and result.command_s >= 0
    assert b"kernel-noise" in result.console_log.read_bytes()
    assert "command" in result.timings()


def test_boot_timeout_kills_the_whole_process_group(tmp_path):
    pidfile = tmp_path / "child.pid"
    start = time.monotonic()
    with pytest.raises(NestedError, match="not ready after") as err:
        supervise(tmp_path, f"sleep 300 & echo $! > {pidfile}; echo booting; wait",
                  boot_timeout_s=1.5)
    assert time.monotonic() - start < 10
    assert "console.log" in str(err.value) and "booting" in str(err.value)
    assert not _alive(int(pidfile.read_text()))


def _alive(pid: int) -> bool:
    """Running (a zombie left for a non-reaping init counts as dead)."""
    time.sleep(0.2)
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


def test_command_timeout_and_setup_failure_are_reported(tmp_path):
    with pytest.raises(NestedError, match="still running"):
        supervise(tmp_path, "echo KVMPY-L1-READY; sleep 300", command_timeout_s=1.0)
    with pytest.raises(NestedError, match="mount host root"):
        supervise(tmp_path, "echo 'KVMPY-L1-SETUP-FAILED mount host root'; sleep 300")


def test_l1_that_does_not_power_off_is_killed_after_the_grace(tmp_path):
    start = time.monotonic()
    result, _ = supervise(tmp_path, "echo KVMPY-L1-READY; echo KVMPY-L1-RC=0; sleep 300",
                          shutdown_grace_s=1.0)
    assert result.rc == 0 and time.monotonic() - start < 10


def test_status_falls_back_to_the_scratch_rc_file(tmp_path):
    (tmp_path / "rc").write_text("4\n")
    result, _ = supervise(tmp_path, "echo KVMPY-L1-READY; echo KVMPY-L1-RC=garbage")
    assert result.rc == 4


def test_harness_config_is_validated():
    for bad in (dict(memory_mib=10), dict(cpus=0), dict(boot_timeout_s=0)):
        with pytest.raises(NestedError):
            HarnessConfig(**bad).validate()


def test_run_guest_records_markers_and_status(tmp_path):
    log = tmp_path / "guest.log"
    run = tier2.run_guest(["sh", "-c", "echo 'KVMPY-INIT-START uptime=0.5'; "
                           "echo KVMPY-TEST-RC=7; exit 0"], timeout_s=30, log_path=log)
    assert run.init_s is not None and run.test_rc == 7
    assert run.exit_status == 0 and not run.timed_out
    assert "KVMPY-TEST-RC=7" in log.read_text() and "KVMPY-INIT-START" in run.tail(5)


def test_run_guest_times_out_and_stops_after_the_grace(tmp_path):
    run = tier2.run_guest(["sh", "-c", "echo booting; sleep 300"], timeout_s=1.0)
    assert run.timed_out and run.exit_status is None and run.test_rc is None
    start = time.monotonic()
    run = tier2.run_guest(["sh", "-c", "echo KVMPY-TEST-RC=0; sleep 300"], timeout_s=60,
                          grace_s=0.5)
    assert run.test_rc == 0 and not run.timed_out and time.monotonic() - start < 10


def test_a_timed_out_kvmpy_is_asked_for_its_state_report_before_the_kill(tmp_path):
    fake = tmp_path / "kvmpy"  # stands in for `python -m kvmpy`: answers SIGUSR2 like Machine
    fake.write_text("#!/bin/sh\ntrap 'echo vcpu0: halted rip=0x1234; echo exits answered in C so far: 9' USR2\n"
                    "echo booting\nwhile :; do sleep 0.1; done\n")
    fake.chmod(0o755)
    run = tier2.run_guest([str(fake)], timeout_s=1.0)
    assert run.timed_out and run.exit_status is None
    report = run.output.split("--- timed out: kvmpy's state report (SIGUSR2) ---", 1)[1]
    assert "vcpu0: halted rip=0x1234" in report and "exits answered in C so far: 9" in report
    assert "--- its threads in the host kernel (before the report) ---\ntask " in report
    plain = tier2.run_guest(["sh", "-c", "echo booting; sleep 300"], timeout_s=0.5)
    assert "state report" not in plain.output  # only kvmpy gets the signal


def test_run_guest_reports_a_missing_vmm():
    with pytest.raises(NestedError):
        tier2.run_guest(["/nonexistent/vmm"], timeout_s=1)


def test_test_script_arg_round_trips_and_refuses_oversized_scripts():
    arg = tier2.test_script_arg("echo hi\n")
    assert base64.b64decode(arg.split("=", 1)[1]) == b"echo hi\n"
    with pytest.raises(NestedError):
        tier2.test_script_arg("x" * 2000)


def test_qemu_guest_argv_picks_the_transport_per_machine(tmp_path):
    pc = tier2.qemu_guest_argv(tmp_path / "bz", tmp_path / "rd", disk=tmp_path / "d.ext4")
    micro = tier2.qemu_guest_argv(tmp_path / "bz", tmp_path / "rd", machine="microvm",
                                  disk=tmp_path / "d.ext4")
    assert "virtio-blk-pci,drive=disk0" in pc and "virtio-blk-device,drive=disk0" in micro
    assert "-enable-kvm" in pc and "-no-reboot" in pc
    with pytest.raises(NestedError):
        tier2.qemu_guest_argv(tmp_path / "bz", tmp_path / "rd", machine="isapc")
    kv = tier2.kvmpy_guest_argv(tmp_path / "bz", tmp_path / "rd", disk=tmp_path / "d.ext4")
    assert kv[1:4] == ["-m", "kvmpy", "boot"] and kv[-2:] == ["--drive", f"file={tmp_path}/d.ext4"]


def test_tier2_mode(monkeypatch):
    monkeypatch.setenv("KVMPY_IN_NESTED", "1")
    assert tier2.tier2_mode().kind == "inside" and tier2.tests_can_run_here() is None
    monkeypatch.delenv("KVMPY_IN_NESTED")
    monkeypatch.setattr(tier2, "host_kvm_kind", lambda: "hardware")
    assert tier2.tier2_mode().kind == "direct"
    monkeypatch.setattr(tier2, "host_kvm_kind", lambda: "pvm")
    monkeypatch.setattr(tier2.shutil, "which", lambda name: None)
    mode = tier2.tier2_mode()
    assert mode.kind == "unavailable" and "vmx/svm" in mode.reason
    from kvmpy.nested import tier2driver
    assert tier2driver.run_tier2() == 2


def test_cli_run_without_a_command_is_a_usage_error(capsys):
    assert cli.main_argv(["run", "--"]) == 2
    assert "give a command" in capsys.readouterr().err


def test_l1_monitor_socket_in_scratch_unless_given(tmp_path, monkeypatch):
    from types import SimpleNamespace
    h = fake_harness()
    h.kernel = SimpleNamespace(vmlinux=tmp_path / "vmlinux")
    h.initrd = tmp_path / "l1.cpio.gz"
    monkeypatch.setattr("kvmpy.nested.harness.cache_root", lambda: tmp_path)
    monkeypatch.setattr("kvmpy.nested.harness._check_share_path", lambda p: str(p))
    monkeypatch.delenv("KVMPY_L1_MONITOR", raising=False)
    argv = h._qemu_argv(tmp_path, "run", interactive=False)
    # the watch's diagnosis needs it on every run; nokaslr lets System.map name addresses
    assert argv[argv.index("-monitor") + 1] == f"unix:{tmp_path / 'l1-monitor.sock'},server=on,wait=off"
    assert "nokaslr" in argv[argv.index("-append") + 1].split()
    assert "-monitor" not in h._qemu_argv(tmp_path, "shell", interactive=True)   # on the tty
    monkeypatch.setenv("KVMPY_L1_MONITOR", str(tmp_path / "mon.sock"))
    argv = h._qemu_argv(tmp_path, "run", interactive=False)
    assert argv[argv.index("-monitor") + 1] == f"unix:{tmp_path / 'mon.sock'},server=on,wait=off"


def test_l1_that_dies_under_the_command_is_reported_like_a_wedge(tmp_path):
    """A kernel panic ends QEMU (panic=-1, -no-reboot): the tier-2 driver must see it as L1's
    failure, with the panic on the console as the diagnosis, not as a harness error."""
    from kvmpy.nested.harness import L1WedgedError
    with pytest.raises(L1WedgedError) as err:
        supervise(tmp_path, "echo KVMPY-L1-READY; echo 'Kernel panic - not syncing: corrupted stack end'; exit 0")
    assert "L1 ended under the command" in err.value.reason
    assert "corrupted stack end" in err.value.diagnosis


def test_l1_oops_under_the_command_is_a_wedge_after_its_trace(tmp_path):
    """The stack-guard oops (QEMU's TCG took an interrupt right after VMRUN) leaves L1 running
    with a CPU that may never take an interrupt again: ended as a wedge once its trace is in
    the console log, not after the tests that follow have failed on it."""
    from kvmpy.nested.harness import L1WedgedError
    start = time.monotonic()
    with pytest.raises(L1WedgedError) as err:
        supervise(tmp_path, "echo KVMPY-L1-READY; echo test-output; "
                  "echo '[  348.021258] BUG: TASK stack guard page was hit at 000000004626bff3'; "
                  "echo '[  348.021258] CPU: 0 PID: 474 Comm: kvmpy-vcpu0'; sleep 300")
    assert time.monotonic() - start < 60
    assert "oopsed" in err.value.reason and "stack guard page" in err.value.reason
    assert "Comm: kvmpy-vcpu0" in err.value.diagnosis      # the trace after the first line


def test_oops_text_before_l1_is_ready_is_not_a_wedge(tmp_path):
    """Only L1's console while the command runs counts; an ordinary run is untouched."""
    result, out = supervise(tmp_path, "echo 'BUG: TASK stack guard page was hit (early)'; "
                            "echo KVMPY-L1-READY; echo fine; echo KVMPY-L1-RC=0")
    assert result.rc == 0 and out == "fine\n"
