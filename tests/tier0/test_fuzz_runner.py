"""fuzz/run.py, the runner behind `make fuzz`: its start order (slowest first), its job limit and
the drop to one job while the nested-harness lock is held, the rates file it learns the order
from, and its command line (--runs alone means no time limit). No target is run here: the
scheduler is driven with stand-in jobs, so nothing depends on atheris or on how fast this host is.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import sys
import threading
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "fuzz" / "run.py"
_spec = importlib.util.spec_from_file_location("kvmpy_fuzz_run", _PATH)
run = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = run          # its dataclass looks its module up there
_spec.loader.exec_module(run)


def test_slowest_first_uses_recorded_rates_then_estimates():
    rates = {"options": 50.0, "qmp": 9000.0}          # as a loaded host might have recorded them
    order = run.slowest_first(["qmp", "options", "virtio_net", "migrate_codec"], rates)
    assert order == ["options", "virtio_net", "migrate_codec", "qmp"]
    assert run.slowest_first(run.TARGETS, {})[0] == "virtio_net"
    assert sorted(run.slowest_first(run.TARGETS, {})) == sorted(run.TARGETS)


def test_a_budgeted_run_starts_the_fastest_first():
    rates = {"qmp": 700.0, "options": 3900.0, "virtio_net": 500.0}
    assert run.start_order(["qmp", "options", "virtio_net"], rates, budgeted=False) == ["virtio_net", "qmp", "options"]
    assert run.start_order(["qmp", "options", "virtio_net"], rates, budgeted=True) == ["options", "qmp", "virtio_net"]


def test_every_target_has_an_estimate_and_a_ci_budget():
    assert set(run.ESTIMATED_RATES) == set(run.TARGETS)
    assert set(run.CI_RUNS) == set(run.TARGETS)


class Recorder:
    """A stand-in for run_target: records how many run at once."""

    def __init__(self, barrier: threading.Barrier | None = None):
        self.lock, self.now, self.most, self.started = threading.Lock(), 0, 0, []
        self.barrier = barrier

    def __call__(self, name: str) -> str:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            self.started.append(name)
        if self.barrier is not None and len(self.started) <= self.barrier.parties:
            self.barrier.wait()          # the first two meet: they must run side by side
        with self.lock:
            self.now -= 1
        return name.upper()


def test_run_all_runs_jobs_side_by_side_in_the_given_order():
    rec = Recorder(threading.Barrier(2, timeout=60))
    names = ["a", "b", "c", "d", "e"]
    results = run.run_all(names, rec, jobs=2, poll_s=0.01)
    assert results == {n: n.upper() for n in names}
    assert rec.most == 2
    assert rec.started[:2] == ["a", "b"] or rec.started[:2] == ["b", "a"]
    assert set(rec.started[2:]) == {"c", "d", "e"}


def test_run_all_drops_to_one_job_while_l1_is_up():
    rec = Recorder()
    results = run.run_all(["a", "b", "c", "d"], rec, jobs=2, busy=lambda: True, poll_s=0.01)
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}
    assert rec.most == 1
    assert rec.started == ["a", "b", "c", "d"]


def test_l1_busy_follows_the_lock(tmp_path):
    lock = tmp_path / "l1.lock"
    assert not run.l1_busy(str(lock))                  # no lock file: nobody booted L1
    lock.touch()
    assert not run.l1_busy(str(lock))
    with open(lock) as held:
        fcntl.flock(held, fcntl.LOCK_EX)               # as `flock /tmp/kvmpy-l1.lock make ...` does
        assert run.l1_busy(str(lock))
        fcntl.flock(held, fcntl.LOCK_UN)
    assert not run.l1_busy(str(lock))


def test_rates_file_keeps_only_libfuzzer_timed_runs(tmp_path):
    results = [run.Result("qmp", iterations=30000, seconds=30.0, timed_by_libfuzzer=True),
               run.Result("options", iterations=100, seconds=12.0),                          # start-up wall time
               run.Result("ports", iterations=5000, seconds=2.0, timed_by_libfuzzer=True)]   # too short to tell
    run.save_rates(tmp_path, results)
    assert run.load_rates(tmp_path) == {"qmp": 1000.0}
    run.save_rates(tmp_path, [run.Result("ports", iterations=48000, seconds=20.0, timed_by_libfuzzer=True)])
    assert run.load_rates(tmp_path) == {"qmp": 1000.0, "ports": 2400.0}


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", json.dumps({"qmp": "fast", "ports": -3})])
def test_a_bad_rates_file_is_ignored(tmp_path, text):
    (tmp_path / "rates.json").write_text(text)
    assert run.load_rates(tmp_path) == {}


def test_runs_alone_means_no_time_limit(monkeypatch):
    for var in ("FUZZ_SECONDS", "FUZZ_RUNS", "FUZZ_JOBS", "FUZZ_TARGETS"):
        monkeypatch.delenv(var, raising=False)
    assert run.parse_args([]).seconds == 60
    args = run.parse_args(["--runs", "1000000"])
    assert (args.runs, args.seconds) == (1000000, 0)
    assert run.parse_args(["--runs", "1000000", "--seconds", "3000"]).seconds == 3000
    ci = run.parse_args(["--ci"])
    assert (ci.seed, ci.seconds) == (run.CI_SEED, 60)
    monkeypatch.setenv("FUZZ_JOBS", "3")
    assert run.parse_args([]).jobs == 3


def test_a_spent_budget_starts_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("FUZZ_BUDGET", raising=False)
    args = run.parse_args(["--runs", "1000000", "--budget", "20", "--workdir", str(tmp_path)])
    started = []
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: started.append(a))
    result = run.run_target("qmp", args, tmp_path)        # 20 s < the 30 s a target needs
    assert result.skipped and result.iterations == 0 and not result.findings and not started
