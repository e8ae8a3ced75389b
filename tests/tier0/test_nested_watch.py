"""Tier 0: the host's watch over L1 (heartbeat, tier-2 progress, diagnosis) and the tier-2
driver that boots a fresh L1 for the tests left when one wedges. Fake clocks, files, a fake
HMP socket and a fake harness stand in for L1."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


from kvmpy.nested import initscripts, tier2driver, watch
from kvmpy.nested.harness import L1WedgedError, NestedResult
from kvmpy.nested.progress import PROGRESS_FILE


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_heartbeat_that_stops_is_a_wedge_and_names_the_running_test(tmp_path):
    clock = Clock()
    w = watch.L1Watch(tmp_path, heartbeat_stale_s=60, clock=clock)
    (tmp_path / watch.HEARTBEAT_FILE).write_text("12.5\n")
    assert w.check() is None
    (tmp_path / PROGRESS_FILE).write_text("collected t::a\nstart t::a\n")
    for step in range(1, 6):            # it keeps beating: alive however long
        clock.now += 50
        (tmp_path / watch.HEARTBEAT_FILE).write_text(f"{12.5 + step * 50}\n")
        assert w.check() is None
    clock.now += 61                     # no new beat for 61 s
    assert not w.heartbeat_stopped
    reason = w.check()
    assert reason is not None and "heartbeat stopped 61s ago" in reason and w.heartbeat_stopped
    assert "262.5" in reason and "during t::a" in reason


def test_no_heartbeat_ever_is_a_wedge_too(tmp_path):
    clock = Clock()
    w = watch.L1Watch(tmp_path, heartbeat_stale_s=60, clock=clock)
    clock.now += 30
    assert w.check() is None
    clock.now += 31
    assert "none ever" in (w.check() or "")


def test_a_test_past_its_budget_is_a_wedge_each_attempt_timed_afresh(tmp_path):
    clock = Clock()
    beat = tmp_path / watch.HEARTBEAT_FILE
    w = watch.L1Watch(tmp_path, test_budget_s=100, heartbeat_stale_s=1e9, clock=clock)
    progress = tmp_path / PROGRESS_FILE
    progress.write_text("collected t::a\ncollected t::b[x y]\nstart t::a\n")
    beat.write_text("1")
    assert w.check() is None
    clock.now += 90
    with progress.open("a") as f:        # a rerun of t::a starts: its clock restarts
        f.write("start t::a\n")
    assert w.check() is None
    clock.now += 90
    assert w.check() is None
    with progress.open("a") as f:        # a partial line is kept until its newline comes
        f.write("end t::a\nstart t::b[x")
    assert w.check() is None and w.progress.current is None
    with progress.open("a") as f:
        f.write(" y]\n")
    assert w.check() is None and w.progress.current == "t::b[x y]"
    clock.now += 50
    assert w.check() is None
    clock.now += 51
    reason = w.check()
    assert reason is not None and reason.startswith("t::b[x y] still running after 101s")
    assert w.progress.remaining() == ["t::b[x y]"] and w.progress.finished == {"t::a"}


def test_progress_plugin_reports_collection_starts_failures_and_ends(tmp_path):
    (tmp_path / "test_s.py").write_text(
        "import pytest\n"
        "def test_ok(): pass\n"
        "def test_bad(): assert False\n"
        "def test_broken_guest(): assert False, 'guest triple fault on vCPU 0'\n"
        "@pytest.mark.parametrize('v', ['a b'])\n"
        "def test_param(v): pass\n")
    env = {**os.environ, "KVMPY_NESTED_SCRATCH": str(tmp_path)}
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-p", "kvmpy.nested.progress", "test_s.py"], cwd=tmp_path, env=env,
                   capture_output=True, timeout=120)
    progress = watch.Tier2Progress()
    for line in (tmp_path / PROGRESS_FILE).read_text().splitlines():
        progress.feed(line)
    assert progress.collected == ["test_s.py::test_ok", "test_s.py::test_bad", "test_s.py::test_broken_guest",
                                  "test_s.py::test_param[a b]"]
    assert progress.finished == set(progress.collected) and progress.current is None
    assert progress.failed == {"test_s.py::test_bad", "test_s.py::test_broken_guest"}
    assert progress.suspect == {"test_s.py::test_broken_guest"} and progress.remaining() == []


def test_symbolizer_names_core_kernel_and_module_addresses(tmp_path):
    system_map = tmp_path / "System.map"
    system_map.write_text("ffffffff81000000 T _text\nffffffff81001000 t native_safe_halt\n"
                          "ffffffff81002000 D some_data\nffffffff81003000 T do_idle\n")
    modules = "kvm_amd 200704 0 - Live 0xffffffffc0a00000\nkvm 1200000 1 kvm_amd, Live 0xffffffffc0100000\n"
    sym = watch.Symbolizer(system_map, modules)
    assert sym.name(0xffffffff81001006) == "native_safe_halt+0x6"
    assert sym.name(0xffffffff81002010) == "native_safe_halt+0x1010"      # data is skipped
    assert sym.name(0xffffffffc0a01234) == "[kvm_amd+0x1234]"             # no .ko to look into
    assert sym.name(0x1000) == "?"


def test_parse_rips_of_info_registers_all_cpus():
    text = ("CPU#0\nRAX=0000000000000000 RBX=0000000000000001\n"
            "RSI=0 RDI=0\nRIP=ffffffff81001006 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\n"
            "CPU#1\r\nRIP=ffffffffc0a01234 RFL=00000002 [-------] CPL=0\n")
    assert watch.parse_rips(text) == {0: 0xffffffff81001006, 1: 0xffffffffc0a01234}


LAPIC = ("dumping local APIC state for CPU {cpu}\r\n\r\nLVT0\t 0x00010700 active-hi edge  masked  ExtINT (vec 0)\r\n"
         "LVTT\t 0x000000ec active-hi edge  one-shot Fixed  (vec 236)\r\n"
         "Timer\t DCR=0x3 (divide by 16) initial_count = 0 current_count = 0\r\n"
         "SPIV\t 0x000001ff APIC enabled, focus=off, spurious vec 255\r\n"
         "ISR\t {isr}\r\nIRR\t (none)\r\n\r\nAPR 0x00 TPR 0x00 PPR 0xe0\r\n")


def _fake_hmp(path: Path) -> threading.Thread:
    """QEMU's human monitor as far as diagnose() uses it: `info registers -a`, `cpu N` and
    `info lapic` (CPU 1's timer vector stuck in service), any number per connection."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    registers = ("CPU#0\r\nRIP=ffffffff81001006 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n"
                 "CPU#1\r\nRIP=ffffffff81003008 RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1\r\n")

    def serve() -> None:
        server.settimeout(20)
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"QEMU 7.2.0 monitor - type 'help' for more information\r\n(qemu) ")
                cpu = 0
                for line in conn.makefile("rb"):
                    command = line.decode().strip()
                    if command == "info registers -a":
                        answer = registers
                    elif command.startswith("cpu "):
                        cpu, answer = int(command.split()[1]), ""
                    else:
                        assert command == "info lapic", command
                        answer = LAPIC.format(cpu=cpu, isr="236" if cpu == 1 else "(none)")
                    conn.sendall(f"{command}\r\n{answer}(qemu) ".encode())
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_diagnose_samples_the_vcpus_and_collects_l1s_own_dump(tmp_path):
    (tmp_path / "System.map").write_text("ffffffff81001000 t native_safe_halt\n"
                                         "ffffffff81003000 T do_idle\n")
    (tmp_path / watch.MODULES_FILE).write_text("")
    monitor = tmp_path / "mon.sock"
    _fake_hmp(monitor)

    def l1_init_answers() -> None:      # what L1's watch_l1 loop does on a request
        request = tmp_path / watch.DUMP_REQUEST_FILE
        while not request.exists():
            time.sleep(0.05)
        request.unlink()
        (tmp_path / watch.DUMP_FILE).write_text("-- task 812/812 state D comm python3\n[<0>] kvm_vcpu_block\n")
        (tmp_path / watch.DUMP_DONE_FILE).write_text("")
    threading.Thread(target=l1_init_answers, daemon=True).start()
    text = watch.diagnose(monitor, tmp_path, lambda mods: watch.Symbolizer(tmp_path / "System.map", mods),
                          samples=2, dump_wait_s=10)
    assert text.count("CPU0 0xffffffff81001006 native_safe_halt+0x6; CPU1 0xffffffff81003008 do_idle+0x8") == 2
    assert "state D comm python3" in text and "kvm_vcpu_block" in text
    assert "CPU0 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=1; LVTT" in text
    assert "CPU1 RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1; LVTT 0x000000ec" in text
    assert "ISR 236; IRR (none); APR 0x00 TPR 0x00 PPR 0xe0" in text and "initial_count = 0" in text
    assert "LVT0" not in text


def test_diagnose_says_when_nothing_answers(tmp_path):
    text = watch.diagnose(tmp_path / "absent.sock", tmp_path, lambda m: watch.Symbolizer(None, m),
                          samples=2, dump_wait_s=0.3)
    assert "absent.sock" in text and "did not answer" in text


def test_l1_init_beats_and_answers_requests_outside_the_chroot():
    script = initscripts.L1_INIT
    watcher = script.index("watch_l1() {")
    assert watcher < script.index(initscripts.L1_READY_MARKER) < script.index("chroot $R /bin/sh -c \". $scratch/env.sh")
    for name in (watch.HEARTBEAT_FILE, watch.DUMP_REQUEST_FILE, watch.DUMP_FILE,
                 watch.DUMP_DONE_FILE, watch.MODULES_FILE):
        assert f'"$S/{name}"' in script
    assert "kill $watcher" in script
    subprocess.run(["sh", "-n"], input=script.encode(), check=True)


class FakeL1:
    """Stands in for L1Harness.run: each boot follows a script of what happens in it."""

    def __init__(self, boots: list[tuple[str, list[str], list[str]]]):
        # (outcome "wedge"|rc, finished tests, failed tests); the stuck test is the first
        # selected test not finished
        self.boots = boots
        self.selections: list[list[str]] = []

    def run(self, command: str, cwd=None, env=None, out=None, watch_factory=None):
        import shlex
        argv = shlex.split(command)
        selection = argv[argv.index("signal") + 5:]      # after the hang guard
        self.selections.append(selection)
        outcome, finished, failed, *suspect = self.boots[len(self.selections) - 1]
        if outcome != "wedge":
            if watch_factory is not None:       # what the progress plugin told of this boot
                progress = watch_factory(Path("/nonexistent")).progress
                for n in finished:
                    progress.feed(f"collected {n}")
                    progress.feed(f"start {n}")
                    progress.feed(f"failed {n}" if n in failed else f"end {n}")
                    if suspect and n in suspect[0]:
                        progress.feed(f"l1-suspect {n}")
                    progress.feed(f"end {n}")
            return NestedResult(rc=int(outcome), init_s=1, ready_s=2, command_s=3, total_s=4,
                                console_log=Path("/x.log"))
        progress = watch.Tier2Progress()
        collected = ALL if selection[0] == tier2driver.TIER2_DIR else [s for s in selection if "::" in s]
        for n in collected:
            progress.feed(f"collected {n}")
        for n in finished:
            progress.feed(f"start {n}")
            if n in failed:
                progress.feed(f"failed {n}")
            progress.feed(f"end {n}")
        stuck = next(n for n in collected if n not in finished)
        progress.feed(f"start {stuck}")
        raise L1WedgedError("heartbeat stopped", "diag", progress, Path("/x.log"))


ALL = ["tests/tier2/test_a.py::t1", "tests/tier2/test_a.py::t2", "tests/tier2/test_b.py::t3"]


def _drive(fake: FakeL1, args: list[str] | None = None, max_boots: int = tier2driver.MAX_L1_BOOTS) -> int:
    return tier2driver.run_in_l1(args or [], [tier2driver.TIER2_DIR], 100, max_boots=max_boots, harness=fake)


def test_driver_boots_a_fresh_l1_for_the_rest_stuck_test_first(capsys):
    fake = FakeL1([("wedge", [ALL[0]], []), ("0", [], [])])
    assert _drive(fake, ["-x"]) == 0
    assert fake.selections == [[tier2driver.TIER2_DIR, "-x"], [ALL[1], ALL[2], "-x"]]
    err = capsys.readouterr().err
    assert "L1 boot 1 wedged: heartbeat stopped" in err and "passed after L1 wedged 1 time(s)" in err


def test_driver_fails_a_test_that_wedges_l1_three_times_but_runs_the_others(capsys):
    assert tier2driver.MAX_WEDGES_PER_TEST == 3
    fake = FakeL1([("wedge", [], []), ("wedge", [], []), ("wedge", [], []), ("0", [], [])])
    assert _drive(fake) == 1
    assert fake.selections[1] == ALL and fake.selections[2] == ALL and fake.selections[3] == ALL[1:]
    assert f"these tests wedged L1 3 times: {ALL[0]}" in capsys.readouterr().err
    # twice, then it passes: the tier passes, saying so
    fake = FakeL1([("wedge", [], []), ("wedge", [], []), ("0", [], [])])
    assert _drive(fake) == 0
    assert "passed after L1 wedged 2 time(s) in: " + ALL[0] in capsys.readouterr().err


def test_driver_reruns_a_failure_from_before_a_wedge_once_on_a_fresh_l1(capsys):
    # t1 failed in the boot that then wedged in t2: the fresh L1 runs t2 (stuck) first, then t1
    fake = FakeL1([("wedge", [ALL[0]], [ALL[0]]), ("0", [], [])])
    assert _drive(fake) == 0
    assert fake.selections[1] == [ALL[1], ALL[0], ALL[2]]
    err = capsys.readouterr().err
    assert "running them once more on a fresh L1: " + ALL[0] in err
    assert "failed in an L1 that then wedged and passed on a fresh one: " + ALL[0] in err
    # it fails on the fresh L1 too: pytest's status fails the tier
    assert _drive(FakeL1([("wedge", [ALL[0]], [ALL[0]]), ("1", [], [])])) == 1
    # it fails again in a second L1 that wedges as well: the tier fails at the end
    fake = FakeL1([("wedge", [ALL[0]], [ALL[0]]), ("wedge", [ALL[1], ALL[0]], [ALL[0]]), ("0", [], [])])
    assert _drive(fake) == 1
    assert fake.selections[2] == [ALL[2]]
    assert "tests failed in two boots of L1 that later wedged" in capsys.readouterr().err


def test_driver_reruns_failures_that_show_l1_broke_the_guest_once_on_a_fresh_l1(capsys):
    # every failure shows a broken guest: those run once more on a fresh L1 and must pass there
    fake = FakeL1([("1", ALL, [ALL[1], ALL[2]], [ALL[1], ALL[2]]), ("0", [], [])])
    assert _drive(fake) == 0
    assert fake.selections[1] == [ALL[1], ALL[2]]
    err = capsys.readouterr().err
    assert "running them once more on a fresh L1, where they must pass: " + f"{ALL[1]} {ALL[2]}" in err
    assert "failed with a guest broken by L1 and passed on a fresh one" in err
    # they fail there again: the tier fails, and nothing is run a third time
    fake = FakeL1([("1", ALL, [ALL[1]], [ALL[1]]), ("1", [ALL[1]], [ALL[1]], [ALL[1]]), ("0", [], [])])
    assert _drive(fake) == 1 and len(fake.selections) == 2
    # a failure after a suspect one in the same file (a shared guest) is its fallout: rerun too
    fake = FakeL1([("1", ALL, [ALL[0], ALL[1]], [ALL[0]]), ("0", [], [])])
    assert _drive(fake) == 0 and fake.selections[1] == [ALL[0], ALL[1]]
    # ... but not one in another file
    fake = FakeL1([("1", ALL, [ALL[1], ALL[2]], [ALL[1]]), ("0", [], [])])
    assert _drive(fake) == 1 and len(fake.selections) == 1
    # one failure without such a sign: no rerun at all
    fake = FakeL1([("1", ALL, [ALL[0], ALL[1]], [ALL[1]]), ("0", [], [])])
    assert _drive(fake) == 1 and len(fake.selections) == 1


def test_progress_plugin_marks_failures_that_show_a_broken_guest():
    from kvmpy.nested import progress
    assert progress.l1_suspect("kvmpy: guest triple fault on vCPU 1: guest shut down (triple fault)")
    assert progress.l1_suspect("[  109.5] rcu: RCU grace-period kthread stack dump:")
    assert not progress.l1_suspect("AssertionError: the guest's data changed")
    # a timed-out guest's state report: the vCPU re-injecting a #PF for an unmapped fetch
    stuck = ("vcpu0: runnable rip=0xffffffffc044020c\n  events: exception 14 injected error 0x10\n"
             "  code: (0xffffffffc044020c is not mapped)\n")
    assert progress.l1_suspect(stuck)
    assert not progress.l1_suspect("  events: exception 14 injected error 0x10\n")   # alone: a kvmpy bug


def test_progress_plugin_reads_the_guest_logs_attached_to_a_failure(tmp_path, monkeypatch):
    """The livelock shows in the guest log section the tier-2 conftest adds, not the assertion."""
    from types import SimpleNamespace

    from kvmpy.nested import progress
    monkeypatch.setattr(progress, "_stream", (tmp_path / "progress").open("w"))
    log = "KVMPY-PING-OK\n  events: exception 14 injected error 0x10\n  code: (0xffffffffc044020c is not mapped)\n"
    progress.pytest_runtest_logreport(SimpleNamespace(
        failed=True, nodeid="t.py::test_net", longreprtext="AssertionError: guest -> host ping failed",
        longrepr=None, sections=[("guest log: kvmpy-net (timed out, 301.2s)", log)]))
    progress._stream.close()
    assert (tmp_path / "progress").read_text().splitlines() == ["failed t.py::test_net", "l1-suspect t.py::test_net"]


def test_driver_gives_up_after_max_boots(capsys):
    fake = FakeL1([("wedge", [], []), ("wedge", [ALL[1]], []), ("wedge", [], [])])
    assert _drive(fake, max_boots=3) == 1
    assert "wedged 3 times" in capsys.readouterr().err


def test_driver_passes_pytest_status_through():
    assert _drive(FakeL1([("1", [], [])])) == 1
    assert _drive(FakeL1([("0", [], [])])) == 0


def test_l1_init_stops_page_migration_before_any_guest_and_reports_it():
    # L1 wedged or panicked within minutes whenever its memory was compacted beside running
    # guests: the settings come before the key pin's VMs and READY, and the counters that show
    # whether memory moved anyway are printed before the command's status
    script = initscripts.L1_INIT
    settings = ["echo madvise > $T/enabled", "echo never > $T/defrag", "echo 0 > $T/khugepaged/defrag",
                "khugepaged/scan_sleep_millisecs", "echo 0 > /proc/sys/vm/compaction_proactiveness",
                "echo 1000 > /proc/sys/vm/extfrag_threshold",
                "echo 0 > /proc/sys/vm/compact_unevictable_allowed"]
    keypin = script.index("kvmpy-keypin.py")
    for line in settings:
        assert 0 < script.index(line) < keypin < script.index(initscripts.L1_READY_MARKER)
    assert script.index("T=/sys/kernel/mm/transparent_hugepage") < script.index(settings[0])
    assert script.count("\nvmstat_line\n") == 2
    assert script.rindex("\nvmstat_line\n") < script.index('echo "$rc" > "$R$scratch/rc"')
    assert f'echo "{initscripts.L1_VMSTAT_MARKER} ' in script and "pgmigrate_success" in script


STUCK = ("CPU0 RFL=00000212 [----A--] CPL=0 II=0 A20=1 SMM=0 HLT=1; LVTT 0x000000ec; Timer DCR=0x3 "
         "initial_count = 206258 current_count = 0; ISR (none); IRR 236 251 253; APR 0x00 TPR 0x10 PPR 0x10")
AWAKE = ("CPU1 RFL=00000216 [----AP-] CPL=0 II=0 A20=1 SMM=0 HLT=0; LVTT 0x000000ec; ISR (none); "
         "IRR 236; APR 0x01 TPR 0x10 PPR 0x10")


def test_lost_wakeups_are_halted_cpus_with_if_set_and_a_vector_above_ppr():
    assert watch.lost_wakeups([STUCK, AWAKE]) == {0: "236 251 253"}
    assert watch.lost_wakeups([STUCK.replace("RFL=00000212", "RFL=00000012")]) == {}     # IF=0
    assert watch.lost_wakeups([STUCK.replace("IRR 236 251 253", "IRR (none)")]) == {}
    assert watch.lost_wakeups([STUCK.replace("IRR 236 251 253", "IRR 20")]) == {}        # not above PPR 0x10
    assert watch.lost_wakeups([STUCK.replace("PPR 0x10", "PPR 0xf0")]) == {}


def first_wedge(tmp_path, probes: list[list[str]], seconds: int) -> tuple[int, str]:
    """Poll an L1Watch once a (fake) second whose probes return `probes` in turn (one every
    LOST_WAKEUP_PROBE_S): the second at which it first calls L1 wedged, and why."""
    now = [0.0]
    samples = iter(probes)
    w = watch.L1Watch(tmp_path, heartbeat_stale_s=1e9, clock=lambda: now[0], probe=lambda: next(samples))
    reasons = []
    for t in range(seconds):
        now[0] = float(t)
        reasons.append(w.check())
    first = next(i for i, r in enumerate(reasons) if r)
    return first, reasons[first]


def test_a_cpu_that_stays_unwoken_for_30s_is_a_wedge_a_passing_one_is_not(tmp_path):
    first, reason = first_wedge(tmp_path, [[STUCK, AWAKE], [AWAKE], [STUCK], [STUCK], [STUCK], [STUCK]], 60)
    assert first == 50, reason       # stuck from the sample at t=20 (the one at 0 was cleared at 10)
    assert "CPU0 has sat halted for 30s" in reason and "236 251 253" in reason


def test_the_watch_without_a_monitor_socket_never_probes(tmp_path):
    w = watch.L1Watch(tmp_path, heartbeat_stale_s=1e9)
    assert w.check() is None and w.probe() == []


# bench-migrate's hung QEMU round (1500 s): L1's CPU0 in its L2 guest's dirtier loop at CPL 3
IN_GUEST = ("CPU0 RFL=00000206 [-----P-] CPL=3 II=0 A20=1 SMM=0 HLT=0; LVTTHMR 0x00010000 active-hi edge "
            "masked Fixed (vec 0); LVTT 0x000000ec active-hi edge one-shot Fixed (vec 236); Timer DCR=0x3 "
            "(divide by 16) initial_count = 143648 current_count = 0; SPIV 0x000001ff APIC enabled, focus=off, "
            "spurious vec 255; ISR (none); IRR 236 251 253; APR 0x00 TPR 0x10 DFR 0x0f LDR 0x01 PPR 0x10")


def test_a_running_cpu_counts_only_with_its_timer_expired_and_pending():
    assert watch.lost_wakeups([IN_GUEST]) == {0: "236 251 253"}
    assert watch.undelivered_interrupts([IN_GUEST, STUCK.replace("CPU0", "CPU1")]) == {
        0: ("236 251 253", False), 1: ("236 251 253", True)}            # running; halted: the old case
    armed = IN_GUEST.replace("current_count = 0", "current_count = 5120")
    assert watch.lost_wakeups([armed]) == {}                            # busy, its tick still coming
    assert watch.lost_wakeups([IN_GUEST.replace("IRR 236 251 253", "IRR 251 253")]) == {}   # timer taken
    assert watch.lost_wakeups([IN_GUEST.replace("RFL=00000206", "RFL=00000006")]) == {}     # IF=0
    assert watch.lost_wakeups([AWAKE]) == {}        # a vector pending at one probe, no timer line


def test_a_cpu_stuck_in_a_nested_guest_for_30s_is_a_wedge_named_as_such(tmp_path):
    first, reason = first_wedge(tmp_path, [[IN_GUEST]] * 6, 40)
    assert first == 30, reason
    assert "CPU0 has run for 30s" in reason and "timer expired" in reason
