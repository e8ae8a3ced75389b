"""Run the fuzz targets and print one table: target, iterations, rate, corpus size, findings.

    python fuzz/run.py --seconds 60 [--targets virtqueue,qmp] [--jobs 2] [--runs N]   (make fuzz)
    python fuzz/run.py --runs 1000000          (each target until 10^6 inputs, no time limit)
    python fuzz/run.py --ci                                                    (make fuzz-ci)

Each target (fuzz/<name>.py) runs in its own process under libFuzzer (atheris) with its corpus
in <workdir>/corpus/<name> (kept between runs, so coverage accumulates), its seed inputs in
<workdir>/seeds/<name>, and anything it finds in <workdir>/findings/<name>/ (crash-*, timeout-*,
oom-*: replay one with `python fuzz/<name>.py FILE`). libFuzzer stops a target at its first
finding, so "findings" is 0 or 1 per target and run. The exit status is 1 when any target found
something or failed to run.

Targets run --jobs at a time (default: the CPU count), slowest first (by the rate the last run
recorded in <workdir>/rates.json, else a built-in estimate), so the longest target does not start
last. With a --budget, fastest first instead: when the time runs short, most targets have finished
and the cut ones are the slow ones. While the nested-harness lock (/tmp/kvmpy-l1.lock;
FUZZ_L1_LOCK) is held by someone booting L1, no new target starts beside a running one: the
campaign drops to one job and L1 keeps a core.

--ci is the short pass `make test` runs first: every target from its seeds only (a fresh corpus,
so the run does not depend on what earlier runs found), a fixed libFuzzer seed and a fixed
number of inputs per target, sized to keep the whole pass near 10 s on two idle cores.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

FUZZ_DIR = Path(__file__).resolve().parent
REPO_ROOT = FUZZ_DIR.parent
TARGETS = ["virtqueue", "virtio_blk", "virtio_net", "virtio_pci", "virtio_rng_console", "ports", "loaders", "options",
           "migrate_stream", "migrate_codec", "qmp"]
# --ci: inputs per target (1-3 s each on an idle core of the 2-core dev machine); the seed is fixed
CI_RUNS = {"virtqueue": 2000, "virtio_blk": 1000, "virtio_net": 500, "virtio_pci": 1000, "virtio_rng_console": 1000, "ports": 6000,
           "loaders": 6000, "options": 10000, "migrate_stream": 2000, "migrate_codec": 6000, "qmp": 2000}
CI_SEED = 1
FINDING_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")
GOAL = 10 ** 6
# exec/s on the 2-core dev machine with grown corpora (fuzz/README.md): the start order when no
# earlier run recorded rates (only the order matters, not the figures)
ESTIMATED_RATES = {"virtio_net": 500, "qmp": 700, "virtio_blk": 900, "migrate_stream": 1000, "virtqueue": 1200,
                   "virtio_rng_console": 1300, "virtio_pci": 1800, "ports": 2400, "options": 3900, "loaders": 4400,
                   "migrate_codec": 6000}
L1_LOCK = os.environ.get("FUZZ_L1_LOCK", "/tmp/kvmpy-l1.lock")


@dataclass
class Result:
    target: str
    iterations: int = 0
    seconds: float = 0.0
    corpus: int = 0
    findings: list[str] | None = None
    error: str = ""
    timed_by_libfuzzer: bool = False     # seconds are libFuzzer's own (start-up excluded)
    skipped: bool = False                # --budget ran out before it could start

    @property
    def rate(self) -> float:
        return self.iterations / self.seconds if self.seconds > 0 else 0.0


def run_target(name: str, args: argparse.Namespace, workdir: Path) -> Result:
    corpus, seeds = workdir / "corpus" / name, workdir / "seeds" / name
    findings, logs = workdir / "findings" / name, workdir / "logs"
    for d in (corpus, seeds, findings, logs):
        d.mkdir(parents=True, exist_ok=True)
    before = set(os.listdir(findings))
    seconds = args.seconds
    if args.deadline is not None:            # --budget: what is left of it, or not started at all
        left = int(args.deadline - time.monotonic())
        if left < 30:
            return Result(name, findings=[], skipped=True)
        seconds = min(seconds, left) if seconds else left
    cmd = [sys.executable, str(FUZZ_DIR / f"{name}.py"), str(corpus), str(seeds),
           f"-max_total_time={seconds}", f"-timeout={args.timeout}", f"-rss_limit_mb={args.rss_mb}",
           "-print_final_stats=1", f"-artifact_prefix={findings}/", "-max_len=8192"]
    if args.seed is not None:
        cmd.append(f"-seed={args.seed}")
    if args.ci:
        cmd.append(f"-runs={CI_RUNS.get(name, 2000)}")
    elif args.runs:
        cmd.append(f"-runs={args.runs}")
    scratch = Path(tempfile.mkdtemp(prefix=f"kvmpy-fuzz-{name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    env = {**os.environ, "FUZZ_SEED_DIR": str(seeds), "FUZZ_SCRATCH": str(scratch), "PYTHONHASHSEED": "0"}
    start = time.monotonic()
    log_path = logs / f"{name}.log"
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                  timeout=seconds + args.timeout + 120 if seconds else None)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = -1
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    wall = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    result = Result(name, seconds=wall)
    m = re.search(r"stat::number_of_executed_units: (\d+)", text)
    result.iterations = int(m.group(1)) if m else 0
    done = re.search(r"Done (\d+) runs in (\d+) second", text)
    if done and int(done.group(2)) > 0:
        result.seconds = float(done.group(2))     # libFuzzer's own fuzzing time, start-up excluded
        result.timed_by_libfuzzer = True
    result.corpus = len(os.listdir(corpus)) + len(os.listdir(seeds))
    result.findings = sorted(f for f in set(os.listdir(findings)) - before if f.startswith(FINDING_PREFIXES))
    if rc != 0 and not result.findings:
        tail = text.strip().splitlines()[-3:]
        result.error = f"exit status {rc}: {' | '.join(tail)} (log: {log_path})"
    return result


def slowest_first(names: list[str], rates: dict[str, float]) -> list[str]:
    """The start order: the lowest rate (longest to reach a given count) first, so that with
    fewer jobs than targets the slow ones do not start last and stretch the whole run."""
    return sorted(names, key=lambda n: rates.get(n) or ESTIMATED_RATES.get(n) or 1000.0)


def start_order(names: list[str], rates: dict[str, float], budgeted: bool) -> list[str]:
    """Slowest first (the shortest whole run when it can finish); with a budget, fastest first
    (the most targets reach their count when it cannot)."""
    order = slowest_first(names, rates)
    return order[::-1] if budgeted else order


def load_rates(workdir: Path) -> dict[str, float]:
    try:
        rates = json.loads((workdir / "rates.json").read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in rates.items() if isinstance(v, (int, float)) and v > 0} \
        if isinstance(rates, dict) else {}


def save_rates(workdir: Path, results: list[Result]) -> None:
    rates = load_rates(workdir)
    rates.update({r.target: round(r.rate, 1) for r in results if r.timed_by_libfuzzer and r.seconds >= 10})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "rates.json").write_text(json.dumps(rates, indent=1, sort_keys=True) + "\n")


def l1_busy(path: str = "") -> bool:
    """Whether someone holds the nested-harness lock (an L1 boot needs the cores): a
    non-blocking flock attempt, released at once."""
    try:
        fd = os.open(path or L1_LOCK, os.O_RDONLY)
    except OSError:
        return False            # no lock file: nobody has booted L1
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def run_all(order: list[str], run_one, jobs: int, busy=lambda: False, poll_s: float = 5.0) -> dict:
    """run_one(name) for each name in `order`, up to `jobs` at once; while busy() (L1 is up),
    a target starts only when none is running. Returns {name: run_one's result}."""
    pending, running, results = list(order), {}, {}
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            allowed = 1 if busy() else jobs
            while pending and len(running) < allowed:
                name = pending.pop(0)
                running[pool.submit(run_one, name)] = name
            finished, _ = wait(list(running), timeout=poll_s if pending else None, return_when=FIRST_COMPLETED)
            for future in finished:
                results[running.pop(future)] = future.result()
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (and FUZZ_* variables); `seconds` 0 means no time limit (--runs alone)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, default=int(os.environ.get("FUZZ_SECONDS") or 0) or None,
                   help="fuzzing time per target (FUZZ_SECONDS; default 60, or no limit with --runs)")
    p.add_argument("--targets", default=os.environ.get("FUZZ_TARGETS", ""),
                   help=f"comma-separated subset of {', '.join(TARGETS)} (default all; FUZZ_TARGETS)")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("FUZZ_JOBS") or max(1, os.cpu_count() or 1)),
                   help="targets run at once (default: CPU count; FUZZ_JOBS)")
    p.add_argument("--timeout", type=int, default=int(os.environ.get("FUZZ_TIMEOUT") or 5),
                   help="per-input time cap in seconds: a longer input is a hang finding (default 5)")
    p.add_argument("--rss-mb", type=int, default=2048, help="memory cap per target process")
    p.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS") or 0),
                   help="stop a target after this many inputs, even before --seconds (FUZZ_RUNS; "
                        "without --seconds no time limit: --runs 1000000 is issue 13's goal)")
    p.add_argument("--budget", type=int, default=int(os.environ.get("FUZZ_BUDGET") or 0),
                   help="wall-clock seconds for the whole run (FUZZ_BUDGET): a target gets at most what is "
                        "left when it starts, and none starts with under 30 s left (default: no limit)")
    p.add_argument("--seed", type=int, default=None, help="libFuzzer's -seed (default random; --ci: 1)")
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / "build" / "fuzz",
                   help="corpora, seeds, findings and logs (default build/fuzz)")
    p.add_argument("--ci", action="store_true", help="the short, fixed-seed pass `make test` runs")
    args = p.parse_args(argv)
    if args.seconds is None:
        args.seconds = 0 if args.runs and not args.ci else 60
    if args.ci:
        args.seed = CI_SEED if args.seed is None else args.seed
        args.seconds = min(args.seconds, 60)
    args.default_workdir = args.workdir == p.get_default("workdir")
    args.deadline = time.monotonic() + args.budget if args.budget else None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [t for t in args.targets.replace(" ", "").split(",") if t] or TARGETS
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        print(f"error: unknown fuzz target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("error: atheris is not installed: pip install -e '.[fuzz]' (or make fuzz)", file=sys.stderr)
        return 2
    workdir = args.workdir
    if args.ci and args.default_workdir:      # a fresh corpus: the pass does not depend on earlier runs
        workdir = Path(tempfile.mkdtemp(prefix="kvmpy-fuzz-ci-"))
    start = time.monotonic()
    order = start_order(names, load_rates(workdir), budgeted=args.deadline is not None)
    done = run_all(order, lambda n: run_target(n, args, workdir), max(1, args.jobs), l1_busy)
    results = [done[n] for n in names]
    total = time.monotonic() - start
    if not args.ci:
        save_rates(workdir, results)
    print(f"{'target':<20}{'iterations':>12}{'secs':>7}{'exec/s':>9}{'10^6 in':>10}{'corpus':>8}  findings")
    failed = False
    for r in results:
        to_goal = f"{GOAL / r.rate:,.0f}s" if r.rate else "-"
        found = ", ".join(str(workdir / "findings" / r.target / f) for f in r.findings or []) or "0"
        if r.error:
            found = f"ERROR {r.error}"
        elif r.skipped:
            found = "not started: the --budget ran out"
        failed = failed or bool(r.findings) or bool(r.error)
        print(f"{r.target:<20}{r.iterations:>12,}{r.seconds:>7.0f}{r.rate:>9,.0f}{to_goal:>10}{r.corpus:>8}  {found}")
    short = [r.target for r in results if args.runs and not (r.error or r.findings or r.skipped)
             and r.iterations < args.runs]
    skipped = [r.target for r in results if r.skipped]
    print(f"{len(results)} targets in {total:.0f} s (up to {args.jobs} at a time); "
          f"{'FINDINGS: see above' if failed else 'no findings'}"
          + (f"; short of {args.runs:,} inputs (time limit): {', '.join(short)}" if short else "")
          + (f"; not started (budget): {', '.join(skipped)}" if skipped else ""))
    if args.ci and args.default_workdir and not failed:      # only the temporary corpus it made
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
