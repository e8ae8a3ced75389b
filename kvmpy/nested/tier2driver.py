"""The `make test-tier2` driver: tests/tier2 where it can really run, and, in L1, a run that
survives L1 wedging.

Inside L1 two guards stack. pytest-timeout (TIER2_HANG_GUARD) ends a test stuck past every
guest's own timeout with a SIGALRM and reruns it once; that covers a process that SIGKILL does
not end while L1 itself still runs. But L1 has also wedged as a whole (nested SVM under QEMU
TCG): then nothing inside it moves, and a CI run sat for 50 minutes. So the host watches L1
(kvmpy.nested.watch: a heartbeat, and which test runs since when, from kvmpy.nested.progress);
when L1 stops, the host records where it is stuck (vCPU RIPs symbolized, task stacks), kills
it, and boots a fresh L1 for the tests not yet run, the stuck one first. A test that wedges L1
three times (MAX_WEDGES_PER_TEST) fails the tier; so does a run that wedges more than
MAX_L1_BOOTS - 1 times. A test that failed in an L1 that then wedged runs once more on the
fresh one, where it must pass. So does a test whose failure shows that L1 broke its guest (a
triple fault, the guest kernel's RCU stall or soft-lockup report: progress.L1_SUSPECT_SIGNS)
when every failure of the run is such a one or follows one in its file (a shared guest): once,
on a fresh L1, and it must pass there.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from kvmpy.nested.kernel import REPO_ROOT
from kvmpy.nested.tier2 import TIER2_DIR, tier2_mode

if TYPE_CHECKING:
    from kvmpy.nested.watch import Tier2Progress

# A test stuck past every guest's own timeout (<= 300 s, plus one livelock rerun) is ended by
# SIGALRM in pytest's main thread after TIER2_TEST_TIMEOUT_S and run once more; an assertion
# failure is never rerun.
TIER2_TEST_TIMEOUT_S = 720
TIER2_HANG_GUARD = ("--timeout", str(TIER2_TEST_TIMEOUT_S), "--timeout-method", "signal",
                    "--reruns", "1", "--only-rerun", "from pytest-timeout")
# Past this, in one attempt, pytest-timeout did not end the test: L1 is wedged.
TIER2_TEST_BUDGET_S = TIER2_TEST_TIMEOUT_S + 180
# One CI replica wedged L1 twice in 25 minutes (CPU0 looping in the int3 of kernel text patching,
# CPU1 on a spinlock; once under kvmpy, once under the QEMU reference): each costs ~2 minutes.
MAX_L1_BOOTS = 5
# A test under which L1 wedged or panicked this often fails the tier. Three, not two: the bridged
# pair (tests/tier2/test_kvmpy_net.py) panicked L1 twice in a row in one replica ("corrupted stack
# end" in a kvmpy vCPU thread) after passing in four; L1's kernel, not the test, panics.
MAX_WEDGES_PER_TEST = 3
L1_COMMAND_TIMEOUT_S = 3000.0


def prebuild_images() -> None:
    """Build what tier-2 tests need on the host, where Python is ~10x faster than in L1;
    the shared cache makes them hits inside L1."""
    from kvmpy.nested.images import build_guest_initramfs, build_l1_initramfs
    from kvmpy.nested.kernel import unpack
    kernel = unpack()
    build_l1_initramfs(kernel)
    build_guest_initramfs(kernel)


def pytest_command(selection: Sequence[str]) -> list[str]:
    # Plugin loading is ~10x slower in L1; tier 2 needs neither hypothesis' nor the cache.
    # --skip-allowlist (tests/skipcheck.py): a tier-2 skip is a failure unless environmental.
    return [sys.executable, "-m", "pytest", "-q", "-rs", "--skip-allowlist",
            "-p", "no:hypothesispytest", "-p", "no:cacheprovider", "-p", "kvmpy.nested.progress",
            *TIER2_HANG_GUARD, *selection]


def run_tier2(pytest_args: Sequence[str] = (),
              command_timeout_s: float = L1_COMMAND_TIMEOUT_S) -> int:
    """Run tests/tier2 where it can really run; exit status of pytest, or 2 with a reason."""
    mode = tier2_mode()
    print(f"tier2: {mode.reason}", flush=True)
    # Test paths in the arguments (TIER2_ARGS='tests/tier2/test_x.py') narrow the run to them.
    paths = [] if any(str(a).startswith(TIER2_DIR) for a in pytest_args) else [TIER2_DIR]
    if mode.kind in ("inside", "direct"):
        return subprocess.call(pytest_command([*paths, *pytest_args]), cwd=REPO_ROOT)
    if mode.kind == "unavailable":
        print(f"tier2: FAILED: cannot run tier 2 here: {mode.reason}", file=sys.stderr)
        return 2
    prebuild_images()
    return run_in_l1(list(pytest_args), paths, command_timeout_s)


def run_in_l1(pytest_args: list[str], paths: list[str], command_timeout_s: float,
              max_boots: int = MAX_L1_BOOTS, harness: object | None = None) -> int:
    """Tier 2 in L1, booting a fresh L1 for the rest when one wedges (see the module doc)."""
    from kvmpy.nested.harness import HarnessConfig, L1Harness, L1WedgedError
    from kvmpy.nested.watch import L1Watch
    l1 = harness or L1Harness(HarnessConfig(command_timeout_s=command_timeout_s))
    options = [a for a in pytest_args if not str(a).startswith(TIER2_DIR)]
    selection = [*paths, *pytest_args]
    wedges: dict[str, int] = {}
    lost: list[str] = []
    retried: set[str] = set()
    failed_before = False
    guest_reruns: list[str] = []
    watches: list[L1Watch] = []

    def new_watch(scratch: Path) -> L1Watch:
        watches.append(L1Watch(scratch, test_budget_s=TIER2_TEST_BUDGET_S))
        return watches[-1]
    for boot in range(1, max_boots + 1):
        try:
            result = l1.run(shlex.join(pytest_command(selection)), cwd=REPO_ROOT, watch_factory=new_watch)
        except L1WedgedError as e:
            progress = e.progress
            stuck = progress.current
            print(f"\ntier2: L1 boot {boot} wedged: {e.reason}\ntier2: L1 console log: "
                  f"{e.console_log}", file=sys.stderr, flush=True)
            if not progress.collected:
                print("tier2: FAILED: L1 wedged before pytest had collected the tests",
                      file=sys.stderr)
                return 1
            # A failure in an L1 that then wedged or panicked is suspect (L1 has been seen to
            # corrupt its guests' memory before it panicked): such a test runs once more on the
            # fresh L1, and fails the tier if it fails there too, or again before a wedge.
            failed_here = progress.failed & progress.finished
            failed_before = failed_before or bool(failed_here & retried)
            suspect = [n for n in progress.collected if n in failed_here and n not in retried]
            retried.update(suspect)
            if suspect:
                print("tier2: these tests failed in this L1 before it wedged; running them once "
                      "more on a fresh L1: " + " ".join(suspect), file=sys.stderr, flush=True)
            remaining = suspect + progress.remaining()
            if stuck is not None:
                wedges[stuck] = wedges.get(stuck, 0) + 1
                if wedges[stuck] >= MAX_WEDGES_PER_TEST:
                    lost.append(stuck)
                    remaining = [n for n in remaining if n != stuck]
                    print(f"tier2: {stuck} wedged L1 {MAX_WEDGES_PER_TEST} times: it fails the tier",
                          file=sys.stderr, flush=True)
                else:
                    remaining = [stuck] + [n for n in remaining if n != stuck]
            if not remaining:
                break
            if boot == max_boots:
                print(f"tier2: FAILED: L1 wedged {boot} times; {len(remaining)} tests never ran: "
                      + " ".join(remaining), file=sys.stderr)
                return 1
            print(f"tier2: booting a fresh L1 for the {len(remaining)} tests left",
                  file=sys.stderr, flush=True)
            selection = [*remaining, *options]
            continue
        print(f"nested: {result.timings()}", flush=True)
        rerun = _guest_breakage_rerun(watches[-1].progress if watches else None, result.rc,
                                      bool(guest_reruns or retried or lost or failed_before))
        if rerun and boot < max_boots:
            guest_reruns = rerun
            print("tier2: every test that failed shows a guest L1 broke (triple fault, RCU stall or "
                  "soft lockup: kvmpy/nested/l0qemu.py); running them once more on a fresh L1, where "
                  "they must pass: " + " ".join(rerun) + f" (L1 console log: {result.console_log})",
                  file=sys.stderr, flush=True)
            selection = [*rerun, *options]
            continue
        if result.rc != 0:
            print(f"nested: tier 2 failed (status {result.rc}); L1 console log: "
                  f"{result.console_log}", file=sys.stderr)
        if lost:
            print(f"tier2: FAILED: these tests wedged L1 {MAX_WEDGES_PER_TEST} times: " + " ".join(lost), file=sys.stderr)
        if failed_before:
            print("tier2: FAILED: tests failed in two boots of L1 that later wedged (see above)",
                  file=sys.stderr)
        if lost or failed_before:
            return result.rc or 1
        if boot > 1 and result.rc == 0:
            print(f"tier2: passed after L1 wedged {boot - 1} time(s)"
                  + (" in: " + ", ".join(wedges) if wedges else "")
                  + " (diagnosis above and in the console logs)", file=sys.stderr)
        if guest_reruns and result.rc == 0:
            print("tier2: these tests failed with a guest broken by L1 and passed on a fresh one: "
                  + " ".join(guest_reruns), file=sys.stderr)
        if retried and result.rc == 0:
            print("tier2: these tests failed in an L1 that then wedged and passed on a fresh one: "
                  + " ".join(sorted(retried)), file=sys.stderr)
        return result.rc
    return 1 if (lost or failed_before) else 0


def _guest_breakage_rerun(progress: "Tier2Progress | None", rc: int, rerun_already: bool) -> list[str]:
    """The tests to run once more on a fresh L1: those that failed, when each failure shows that
    L1 broke a guest, or follows such a failure in its file (migration-faults' tests share one
    source guest: once L1 broke it, the tests after fail on it), and nothing was rerun yet; else none."""
    if rc == 0 or rerun_already or progress is None:
        return []
    failed = [n for n in progress.collected if n in progress.failed]
    broken_files: set[str] = set()
    for n in failed:        # in collection order: a suspect failure comes before its fallout
        if n in progress.suspect:
            broken_files.add(n.split("::")[0])
        elif n.split("::")[0] not in broken_files:
            return []
    return failed
