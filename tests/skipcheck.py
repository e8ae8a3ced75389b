"""Skips are reported, and in CI only environmental ones are allowed.

A skip hides whatever it skips, so a skip caused by kvmpy itself (a wrong ioctl number that makes
/dev/kvm "unavailable", a capability check that answers 0) would turn a broken kvmpy into a green
run. This pytest plugin (loaded by tests/conftest.py) lists every skip at the end of the run and,
with `--skip-allowlist` (the Makefile's test recipes) or CI=true, fails the run on any skip whose
reason is not one of ALLOWED_SKIP_REASONS: facts about the machine, never about kvmpy's answers.
"""
from __future__ import annotations

import os
import re

import pytest

# Each entry: a regex matched (re.search) against the skip reason, and why it is environmental.
ALLOWED_SKIP_REASONS: tuple[tuple[str, str], ...] = (
    (r"^no /dev/kvm on this host", "no KVM device node (checked with os.stat, not kvmpy)"),
    (r"^no read/write permission on /dev/kvm", "permission, checked with os.access/os.open"),
    (r"^this host's KVM lacks KVM_CAP_", "the test's own KVM_CHECK_EXTENSION says 0"),
    (r"^gcc is not installed$", "tool missing"),
    (r"^iasl not installed", "tool missing"),
    (r"^cpio\(1\) not installed$", "tool missing"),
    (r"^debugfs", "tool missing"),
    (r"^finding busybox: no static busybox", "tool missing"),
    (r"^seccomp unavailable", "the container forbids installing seccomp filters"),
    (r"^the filter names x86-64 syscall numbers$", "not an x86-64 host"),
    (r"^no Debian kernel downloaded", "outside CI: the kernel package was never fetched"),
)


def unexpected_skips(skips: list[tuple[str, str]],
                     allowed: tuple[tuple[str, str], ...] = ALLOWED_SKIP_REASONS) -> list[tuple[str, str]]:
    """The (test id, reason) pairs whose reason matches no allowed pattern."""
    return [(nodeid, reason) for nodeid, reason in skips
            if not any(re.search(pattern, reason) for pattern, _ in allowed)]


def skip_reason(report: pytest.TestReport) -> str:
    """The reason pytest stores for a skip ('Skipped: ' prefix removed)."""
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--skip-allowlist", action="store_true", default=False,
                     help="fail the run on any skip whose reason is not environmental "
                          "(tests/skipcheck.py ALLOWED_SKIP_REASONS); implied by CI=true")


# pytest_runtest_logreport gets no config; one run per process, so module state is enough.
_STATE: dict[str, list] = {"skips": []}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        _STATE["skips"].append((report.nodeid, skip_reason(report)))


def _enforced(config: pytest.Config) -> bool:
    return bool(config.getoption("--skip-allowlist", default=False)) or os.environ.get("CI") == "true"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # type: ignore[no-untyped-def]
    bad = unexpected_skips(_STATE["skips"])
    if bad and _enforced(config):
        terminalreporter.section("skips not on the allow-list (tests/skipcheck.py)", red=True)
        for nodeid, reason in bad:
            terminalreporter.line(f"NOT ALLOWED: {nodeid}: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _enforced(session.config) and unexpected_skips(_STATE["skips"]) \
            and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
