"""Tier 0: tier 2 reruns a kvmpy guest once when it hit the known L1 livelock, and only then."""
from __future__ import annotations

from kvmpy.nested import tier2

KVMPY = ["python", "-m", "kvmpy", "boot"]
LIVELOCK = ("vcpu0: runnable rip=0xffffffffc045e20c\n  events: exception 14 injected error 0x10\n"
            "  code: (0xffffffffc045e20c is not mapped)\n")


def run(output: str, timed_out: bool = True, init_s: float | None = None) -> tier2.GuestRun:
    return tier2.GuestRun(KVMPY, None if timed_out else 0, output, 1.0, init_s, None if timed_out else 0, timed_out)


def fake_runs(monkeypatch, *results):
    calls = []

    def once(argv, timeout_s, log_path, grace_s):
        calls.append(argv)
        return results[len(calls) - 1]
    monkeypatch.setattr(tier2, "_run_guest_once", once)
    return calls


def test_a_livelocked_kvmpy_guest_is_rerun_once(monkeypatch, tmp_path):
    log = tmp_path / "g.log"
    log.write_text("first")
    calls = fake_runs(monkeypatch, run(LIVELOCK), run("KVMPY-TEST-RC=0\n", timed_out=False, init_s=3.0))
    result = tier2.run_guest(KVMPY, 10, log)
    assert len(calls) == 2 and not result.timed_out and "was rerun" in result.output
    assert (tmp_path / "g.l1-livelock.log").read_text() == "first"


def test_a_second_livelock_fails_and_other_timeouts_are_not_rerun(monkeypatch):
    calls = fake_runs(monkeypatch, run(LIVELOCK), run(LIVELOCK))
    assert tier2.run_guest(KVMPY, 10).timed_out and len(calls) == 2
    calls = fake_runs(monkeypatch, run("no signature here"))
    assert tier2.run_guest(KVMPY, 10).timed_out and len(calls) == 1
    calls = fake_runs(monkeypatch, run(LIVELOCK, init_s=2.0))       # after init: a real hang
    assert tier2.run_guest(KVMPY, 10).timed_out and len(calls) == 1
    qemu = ["qemu-system-x86_64", "-enable-kvm"]
    calls = fake_runs(monkeypatch, run(LIVELOCK))
    assert tier2.run_guest(qemu, 10).timed_out and len(calls) == 1


def test_a_migration_destination_is_never_rerun(monkeypatch):
    # its source is gone by then, and a migrated guest never prints the init marker
    calls = fake_runs(monkeypatch, run(LIVELOCK), run(LIVELOCK))
    assert tier2.run_guest([*KVMPY, "--incoming", "tcp:127.0.0.1:4444"], 10).timed_out
    assert len(calls) == 1


def crashed(output: str, status: int = 3, init_s: float | None = None) -> tier2.GuestRun:
    return tier2.GuestRun(KVMPY, status, output, 6.2, init_s, None, False)


TRIPLE = "kvmpy: guest triple fault on vCPU 0: guest shut down (triple fault)\n"


def test_a_triple_fault_before_init_is_rerun_once_and_judged_after_init(monkeypatch, capsys):
    calls = fake_runs(monkeypatch, crashed(TRIPLE), run("KVMPY-TEST-RC=0\n", timed_out=False, init_s=3.0))
    result = tier2.run_guest(KVMPY, 10)
    assert len(calls) == 2 and "first run hit a triple fault before init" in result.output
    assert "a triple fault before init" in capsys.readouterr().err
    calls = fake_runs(monkeypatch, crashed(TRIPLE), crashed(TRIPLE))       # twice in a row: fails
    assert tier2.run_guest(KVMPY, 10).exit_status == 3 and len(calls) == 2
    for first in (crashed(TRIPLE, init_s=4.0),                            # after init: judged
                  crashed("kvmpy: internal error\n", status=3),           # not a triple fault
                  crashed(TRIPLE, status=2)):                             # another status
        calls = fake_runs(monkeypatch, first)
        tier2.run_guest(KVMPY, 10)
        assert len(calls) == 1
    calls = fake_runs(monkeypatch, crashed(TRIPLE))                       # a paired guest
    tier2.run_guest(KVMPY, 10, rerun_livelock=False)
    assert len(calls) == 1
