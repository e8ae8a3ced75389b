"""Did the migrated guest go on where the source left it? benchmarks/migrate_bench.py's check,
apart so tier 0 tests it (tests/tier0/test_migrate_bench_ticks.py) without namespaces or L1.

The guest prints "KVMPY-TICK N" every half second. A VMM's serial output reaches the benchmark
in pieces cut anywhere (kvmpy's console flusher writes what the UART collected so far; QEMU
writes a byte per THR write), so only a tick with its line end is a tick: the earlier check
matched "KVMPY-TICK 5" while "0\\r\\n" was still on its way and reported tick 50, the guest's
very next tick, as "first tick 5 after 49", a guest that resumed an older state.

A tick the source had started but not ended when it paused ends on the destination: its number
was never seen whole, so the destination's first whole tick may then be the last whole one + 2.

kvmpy's own log lines (stderr, merged into the same pipe) land between a tick and its line end:
"KVMPY-TICK 57kvmpy: [ 50549ms] INFO ... pass 6 ...\n" and only then "\r\n" (L1, 4 MiB round).
Each log line is one write, so it is whole: the log lines are taken out before ticks are read.
"""
from __future__ import annotations

import re

WHOLE_TICK = re.compile(rb"KVMPY-TICK (\d+)\r?\n")
TICK_PREFIX = b"KVMPY-TICK"
KVMPY_LOG_LINE = re.compile(rb"kvmpy: \[ *\d+ms\] [A-Z]+ [^\n]*\n")     # kvmpy/cli/main.py's format


def console_only(output: bytes) -> bytes:
    """A VMM's merged output without kvmpy's log lines: the guest's console, as it printed it."""
    return KVMPY_LOG_LINE.sub(b"", output)


def ticks(output: bytes) -> list[int]:
    """The numbers of the ticks printed whole in a VMM's output."""
    return [int(n) for n in WHOLE_TICK.findall(output)]


def continuation_problem(source_output: bytes, destination_output: bytes) -> str | None:
    """None when the destination's first whole tick follows the source's last whole one (the
    guest went on), else what is wrong. None is not the answer until the destination printed a
    whole tick: "no tick" is a problem the caller waits out."""
    source_output, destination_output = console_only(source_output), console_only(destination_output)
    before, after = ticks(source_output), ticks(destination_output)
    if not before:
        return "the source printed no whole tick"
    if not after:
        return "the destination printed no whole tick"
    last, first = before[-1], after[0]
    began_another = began_a_tick([m.end() for m in WHOLE_TICK.finditer(source_output)][-1], source_output)
    allowed = (last + 1, last + 2) if began_another else (last + 1,)
    if first in allowed:
        return None
    if first <= last:
        return f"the destination's first tick {first} is not after the source's last {last}: " \
               "the guest resumed an older state"
    return f"the destination's first tick {first} skips ticks after the source's last {last}"


def began_a_tick(after: int, output: bytes) -> bool:
    """Whether `output` from `after` on holds the start of a tick it did not end: its prefix
    anywhere (a log line may have followed it), or any start of the prefix at its very end."""
    tail = output[after:]
    return TICK_PREFIX in tail or any(tail.endswith(TICK_PREFIX[:n]) for n in range(1, len(TICK_PREFIX)))
