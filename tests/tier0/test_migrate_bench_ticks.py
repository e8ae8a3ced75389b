"""bench-migrate's check that the guest went on after the migration (benchmarks/migrate_ticks.py).

Its earlier check matched an unended tick: L1's 4 MiB round of kvmpy "failed" with "first tick 5
after 49" when the destination had printed "KVMPY-TICK 5" of tick 50 and its "0\\r\\n" was still
in the pipe. These tests cut the consoles at every byte, as the pipe may."""
from __future__ import annotations

import re
import sys
from pathlib import Path

from hypothesis import given, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from migrate_ticks import console_only, continuation_problem, ticks  # noqa: E402

OLD_TICK = re.compile(rb"KVMPY-TICK (\d+)")     # the check as it was


def console(first: int, last: int) -> bytes:
    return b"".join(b"KVMPY-TICK %d\r\n" % i for i in range(first, last + 1))


def test_the_l1_failure_was_a_tick_cut_in_two():
    source = console(0, 49)
    destination_so_far = b"KVMPY-TICK 5"            # of "KVMPY-TICK 50\r\n"
    old_first = int(OLD_TICK.search(destination_so_far).group(1))
    assert old_first == 5 and old_first <= 49, "the old check reads tick 5 here"
    assert continuation_problem(source, destination_so_far) == "the destination printed no whole tick"
    assert continuation_problem(source, destination_so_far + b"0\r\n") is None


@given(cut=st.integers(min_value=0, max_value=len(console(50, 53))))
def test_a_continuing_guest_passes_wherever_the_destination_output_is_cut(cut):
    destination = console(50, 53)
    problem = continuation_problem(console(0, 49), destination[:cut])
    whole = ticks(destination[:cut])
    assert problem is None if whole else problem == "the destination printed no whole tick"
    if whole:
        assert whole[0] == 50


@given(pause=st.integers(min_value=1, max_value=len(b"KVMPY-TICK 49\r\n") - 1))
def test_a_tick_the_source_began_ends_on_the_destination(pause):
    line = b"KVMPY-TICK 49\r\n"
    source = console(0, 48) + line[:pause]
    destination = line[pause:] + console(50, 51)
    assert continuation_problem(source, destination) is None, (source[-20:], destination[:20])


def test_a_source_log_line_after_its_unended_tick_still_counts_as_begun():
    source = console(0, 48) + b"KVMPY-TICK 4" + b"INFO migrated: 1 passes\n"
    assert continuation_problem(source, b"9\r\n" + console(50, 50)) is None


@given(resumed_at=st.integers(min_value=0, max_value=49))
def test_a_guest_that_resumed_an_older_state_is_reported(resumed_at):
    problem = continuation_problem(console(0, 49), console(resumed_at, resumed_at + 2))
    assert problem is not None and "older state" in problem


def test_skipped_ticks_are_reported():
    assert "skips" in continuation_problem(console(0, 49), console(52, 53))
    assert "skips" in continuation_problem(console(0, 49), console(51, 53))     # 49 ended whole


def test_no_source_tick():
    assert continuation_problem(b"booting\n", console(0, 1)) == "the source printed no whole tick"


def test_log_lines_between_a_tick_and_its_line_end_are_not_console():
    """bench-migrate in L1, 4 MiB round, after the first fix: the source's output read
    "KVMPY-TICK 57kvmpy: [ 50549ms] INFO ...\n\r\n", so 57 and 58 were not whole ticks and the
    destination's 59 looked like a skip; the guest had gone on without a gap."""
    log_line = (b"kvmpy: [ 50549ms] INFO kvmpy.migrate.precopy: migration pass 6: 1162 pages, 4.5 MiB in "
                b"286 ms (log sync 8, send 265, destination catching up 14); 16.7 MB/s, expected downtime 376 ms\n")
    source = (console(0, 56) + b"KVMPY-TICK 57" + log_line + b"\r\n" + b"KVMPY-TICK 58" + log_line.replace(b"50549", b"51263")
              + b"\r\n" + log_line.replace(b"INFO", b"WARNING"))
    destination = b"kvmpy: [ 31293ms] INFO kvmpy.migrate.incoming: incoming: the state loaded\n" + console(59, 60)
    assert ticks(console_only(source))[-2:] == [57, 58]
    assert continuation_problem(source, destination) is None
    assert "older state" in continuation_problem(source, console(40, 41))
