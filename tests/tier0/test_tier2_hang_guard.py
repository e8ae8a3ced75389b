"""Tier 0: tier 2's hang guard (kvmpy.nested.tier2driver.TIER2_HANG_GUARD) ends a test stuck past its
limit and runs it once more, and never reruns an assertion failure."""
from __future__ import annotations

import subprocess
import sys

from kvmpy.nested import tier2driver as tier2

SUITE = '''
import os, subprocess
def _bump(path):
    n = int(open(path).read()) if os.path.exists(path) else 0
    open(path, "w").write(str(n + 1))
    return n
def test_hangs_the_first_time(tmp_path_factory):
    if _bump(os.environ["HANG_COUNT"]) == 0:
        subprocess.run(["sleep", "60"])          # stuck: the guard must end it
def test_fails_an_assertion():
    _bump(os.environ["FAIL_COUNT"])
    assert False
'''


def test_the_guard_ends_a_hang_reruns_it_once_and_never_reruns_an_assertion(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    guard = list(tier2.TIER2_HANG_GUARD)
    guard[guard.index("--timeout") + 1] = "2"          # the real limit is minutes
    env = {"HANG_COUNT": str(tmp_path / "hang"), "FAIL_COUNT": str(tmp_path / "fail"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *guard, "test_suite.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed, 1 rerun" in proc.stdout, proc.stdout[-2000:]
    assert (tmp_path / "hang").read_text() == "2" and (tmp_path / "fail").read_text() == "1"
