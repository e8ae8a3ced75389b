"""The skip allow-list (tests/skipcheck.py): environmental skips pass, any other skip fails the run."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from skipcheck import ALLOWED_SKIP_REASONS, unexpected_skips

TESTS_DIR = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("reason", [
    "no /dev/kvm on this host (os.stat: No such file or directory)",
    "no read/write permission on /dev/kvm (uid 1000)",
    "this host's KVM lacks KVM_CAP_DIRTY_LOG_RING (192)",
    "gcc is not installed",
    "iasl not installed (Debian package acpica-tools; `make deps`)",
    "seccomp unavailable: [Errno 1] Operation not permitted",
    "finding busybox: no static busybox; install busybox-static",
])
def test_environmental_reasons_are_allowed(reason):
    assert unexpected_skips([("t", reason)]) == []


@pytest.mark.parametrize("reason", [
    "/dev/kvm cannot be opened: opening /dev/kvm: KVM API version 12, expected 13",
    "manual dirty-log protect unavailable: enabling manual dirty-log protect on vm",
    "this KVM has no KVM_CAP_DIRTY_LOG_RING",
    "tier 2 cannot run in this process (host KVM is PVM); run it with `make test-tier2`",
    "",
])
def test_skips_that_could_be_kvmpy_bugs_are_not(reason):
    assert unexpected_skips([("t", reason)]) == [("t", reason)]


def test_every_allowed_pattern_says_why():
    assert all(pattern.startswith("^") and why for pattern, why in ALLOWED_SKIP_REASONS)


def run_pytest(tmp_path: Path, body: str, *args: str, ci: str | None = None) -> subprocess.CompletedProcess:
    (tmp_path / "test_sample.py").write_text("import pytest\n" + body)
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTHONPATH")}
    env["PYTHONPATH"] = str(TESTS_DIR)
    if ci is not None:
        env["CI"] = ci
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "skipcheck", "-p", "no:cacheprovider",
                           "-p", "no:hypothesispytest", *args, str(tmp_path)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)


KVMPY_SKIP = "def test_a():\n    pytest.skip('/dev/kvm cannot be opened: KVM API version 12')\n"
TOOL_SKIP = "def test_b():\n    pytest.skip('gcc is not installed')\n"


def test_a_kvmpy_skip_fails_the_run_when_enforced(tmp_path):
    r = run_pytest(tmp_path, KVMPY_SKIP + TOOL_SKIP, "--skip-allowlist")
    assert r.returncode == 1, r.stdout
    assert "NOT ALLOWED: test_sample.py::test_a: /dev/kvm cannot be opened" in r.stdout
    assert "test_b" not in r.stdout.split("skips not on the allow-list")[1]


def test_ci_true_enforces_without_the_flag(tmp_path):
    assert run_pytest(tmp_path, KVMPY_SKIP, ci="true").returncode == 1


def test_not_enforced_locally_and_allowed_skips_pass(tmp_path):
    r = run_pytest(tmp_path, KVMPY_SKIP)
    assert r.returncode == 0 and "SKIPPED" in r.stdout, r.stdout   # -rs still lists it
    assert run_pytest(tmp_path, TOOL_SKIP, "--skip-allowlist").returncode == 0


def test_a_failure_stays_a_failure(tmp_path):
    r = run_pytest(tmp_path, "def test_c():\n    assert False\n" + TOOL_SKIP, "--skip-allowlist")
    assert r.returncode == 1
