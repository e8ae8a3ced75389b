"""Tier 2's progress, told to the host while pytest runs inside L1.

L1 can wedge as a whole (nested SVM under QEMU TCG): then nothing inside it, pytest-timeout
included, can end the stuck test, and the host must see which test was running to restart L1
for the rest. This pytest plugin (`-p kvmpy.nested.progress`, loaded inside L1 only) appends one
line per event to $KVMPY_NESTED_SCRATCH/tier2-progress on the scratch share (9p without a cache:
each write reaches the host file at once):

    collected <nodeid>        every test of the run, once, in order
    start <nodeid>            a test's set-up begins (again for a rerun)
    failed <nodeid>           one of its phases failed (set-up, call or teardown)
    l1-suspect <nodeid>       ... and its report shows a guest L1 broke (L1_SUSPECT_SIGNS)
    end <nodeid>              its teardown is over

A node id holds no newline; a parametrized one may hold spaces, so the reader
(kvmpy.nested.watch.Tier2Progress) splits each line at its first space only.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any

PROGRESS_FILE = "tier2-progress"
# What a failure looks like when L1 (nested SVM under QEMU TCG) broke a guest: it lost interrupts
# and corrupted guest memory (kvmpy/nested/l0qemu.py), so a guest triple-faulted after its init
# or its vCPUs stopped (the guest kernel's RCU stall and soft-lockup reports).
L1_SUSPECT_SIGNS = ("triple fault", "rcu_sched detected stall", "rcu: INFO: rcu_preempt detected stall",
                    "RCU grace-period kthread stack dump", "watchdog: BUG: soft lockup")

# What kvmpy's state report shows for the livelock below kvmpy that nested SVM on QEMU TCG (L1)
# sometimes falls into: the vCPU re-injecting a #PF for an instruction fetch at an address the
# guest never mapped, with no exit to userspace (see the issue notes of the TSC-deadline change;
# seen in a fresh clone's first boot, and once half way through a networking test).
L1_LIVELOCK_SIGNATURE = ("events: exception 14 injected", "is not mapped)")

_stream: IO[str] | None = None


def _emit(kind: str, nodeid: str) -> None:
    if _stream is None:
        return
    _stream.write(f"{kind} {nodeid}\n")
    _stream.flush()


def pytest_configure(config: Any) -> None:
    global _stream
    scratch = os.environ.get("KVMPY_NESTED_SCRATCH")
    if scratch and Path(scratch).is_dir():
        _stream = open(Path(scratch) / PROGRESS_FILE, "a", encoding="utf-8")


def pytest_unconfigure(config: Any) -> None:
    global _stream
    if _stream is not None:
        _stream.close()
        _stream = None


def pytest_collection_finish(session: Any) -> None:
    for item in session.items:
        _emit("collected", item.nodeid)


def pytest_runtest_setup(item: Any) -> None:
    _emit("start", item.nodeid)


def pytest_runtest_logreport(report: Any) -> None:
    if report.failed:
        _emit("failed", report.nodeid)
        text = str(getattr(report, "longreprtext", "") or report.longrepr)
        # and the guests' logs the tier-2 conftest attaches: a timed-out kvmpy guest's state
        # report shows L1's #PF livelock there, not in the assertion
        text += "".join(f"\n{content}" for _, content in getattr(report, "sections", []))
        if l1_suspect(text):
            _emit("l1-suspect", report.nodeid)


def l1_suspect(failure_text: str) -> bool:
    """A sign that L1 broke the guest: L1_SUSPECT_SIGNS, or the state report of a vCPU stuck in
    L1's #PF livelock (L1_LIVELOCK_SIGNATURE), which a CI run hit after the guest's init,
    half way through a networking test, where run_guest does not rerun it."""
    return any(sign in failure_text for sign in L1_SUSPECT_SIGNS) or \
        all(part in failure_text for part in L1_LIVELOCK_SIGNATURE)


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    _emit("end", nodeid)
