"""Live migration's pass loop on this host, without L1: how many passes a guest that keeps
rewriting N MiB takes before the switchover, and why.

The source is kvmpy's real pre-copy engine (kvmpy.migrate.precopy.Precopy, real GuestMemory and
DirtyTracker, real StreamWriter and Channel) over a unix socket to a destination process reading
with kvmpy's real StreamReader / receive_memory_and_state (answering SYNC as --incoming does).
Only KVM is modelled: its dirty log is a bitmap (tests/support/migration.RewritingSource), and
the "guest" rewrites its whole hot set (scattered pages of RAM, as a Linux guest's physical pages
are) between two log reads, as a guest rewriting memory continuously does. So how many passes it
takes follows from the engine's arithmetic and the real send/receive costs, not from how a
2-core host schedules a dirtying thread.

Printed per pass: dirty pages found, MiB sent, the pass's wall time and the part of it spent
writing into the socket, the engine's bandwidth estimate (what the switch decision uses) against
the rate of the writes themselves, and the expected downtime; then the switchover: downtime
(pause to the destination's LOADED, as the engine measures it), its last pass's pages and rate.
`--max-bandwidth` emulates a slower link (the engine's own rate limiter); `--limit-s` cancels a
round that has not switched over by then (reported as such).

First, the send path's cost alone: the source's CPU time for one dirty pass of the hot set, the
guest running and paused, hot pages in runs of 1, 4 and 64 pages. Under nested virtualisation
(L1) the CPU, not the link, bounds a pass, so "MB per CPU-second" here is what scales there
(by the factor Python and memory run slower in L1).

    python benchmarks/migrate_passes.py [--ram-mib 512] [--hot 4,32] [--max-bandwidth MBps] [--cost-only]
"""
from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from kvmpy.errors import MigrationError  # noqa: E402
from kvmpy.memslots import GuestMemory  # noqa: E402
from kvmpy.migrate.channel import ACCEPT, GO, LOADED, OFFER_SYNC, SYNCED, Channel  # noqa: E402
from kvmpy.migrate.precopy import Precopy, receive_memory_and_state  # noqa: E402
from kvmpy.migrate.reader import StreamReader  # noqa: E402
from kvmpy.migrate.stream import SectionKind, StreamWriter  # noqa: E402
from support.migration import RewritingSource  # noqa: E402


class TimedChannel(Channel):
    """A Channel that also counts the seconds spent in write() (the socket taking the bytes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.write_s = 0.0

    def write(self, data) -> int:
        started = time.monotonic()
        try:
            return super().write(data)
        finally:
            self.write_s += time.monotonic() - started


def destination(sock: socket.socket, ram: int, result: "multiprocessing.connection.Connection",
                other_end: socket.socket) -> None:
    """The far end, as kvmpy.migrate.incoming answers: ACCEPT with sync, SYNCED per SYNC,
    LOADED after STATE/END, then GO; sends back the sha256 of the RAM it received."""
    other_end.close()
    memory = GuestMemory.create(ram)
    stream = sock.makefile("rb")
    reader = StreamReader(stream)
    section = reader.next_section()
    assert section is not None and section.kind is SectionKind.CONFIG
    sock.sendall(ACCEPT + b" " + OFFER_SYNC.encode() + b"\n")
    try:
        receive_memory_and_state(reader, [(0, memory.buffer(0, ram))],
                                 on_sync=lambda: sock.sendall(SYNCED + b"\n"))
    except MigrationError as exc:           # the source cancelled a round that did not converge
        result.send(("failed", str(exc)))
        return
    sock.sendall(LOADED + b"\n")
    go = stream.readline(64).rstrip(b"\n") == GO
    result.send(("go" if go else "no go", hashlib.sha256(memory.buffer(0, ram)).hexdigest()))


def one_round(ram_mib: int, hot_mib: int, data_mib: int, max_bandwidth: int, limit_s: float,
              downtime_limit: int) -> None:
    ram = ram_mib << 20
    source = RewritingSource(ram, hot_pages=(hot_mib << 20) // 4096, data_pages=(data_mib << 20) // 4096)
    a, b = socket.socketpair()
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=destination, args=(b, ram, send, a), daemon=True)
    child.start()
    b.close()
    channel = TimedChannel(a)
    engine = Precopy(source, channel, {"downtime-limit": downtime_limit, "max-bandwidth": max_bandwidth})
    rows: list[tuple] = []
    last = {"t": 0.0, "bytes": 0, "write_s": 0.0, "cpu": 0.0}
    at_pause = {"bytes": 0, "cpu": 0.0}

    def on_sync(pages: int) -> None:
        """A read of the dirty log: the pass before it ended (row 0: the first pass, all of RAM)."""
        now = time.monotonic()
        sent, write_s = channel.bytes_sent - last["bytes"], channel.write_s - last["write_s"]
        cpu = time.process_time()
        if source.paused:
            at_pause.update(bytes=channel.bytes_sent, cpu=cpu)
        rows.append((len(rows), sent / 2**20, (now - last["t"]) * 1000, (cpu - last["cpu"]) * 1000, write_s * 1000,
                     sent / max(write_s, 1e-9) / 1e6, engine.bandwidth / 1e6, pages,
                     pages * 4096 / max(engine.bandwidth, 1) * 1000))
        last.update(t=now, bytes=channel.bytes_sent, write_s=channel.write_s, cpu=cpu)

    def on_event(event: str, data: dict) -> None:
        if event == "MIGRATION" and data.get("status") == "active":
            last.update(t=time.monotonic(), bytes=channel.bytes_sent, write_s=channel.write_s,
                        cpu=time.process_time())
    source.on_event, source.on_sync = on_event, on_sync
    timer = threading.Timer(limit_s, engine.cancel)
    timer.start()
    outcome = "completed"
    try:
        stats = engine.run()
    except MigrationError as exc:
        outcome, stats = f"not converged in {limit_s:g} s ({exc})", engine.stats()
    finally:
        timer.cancel()
        final_cpu = time.process_time() - at_pause["cpu"]
        a.close()
    word, digest = receive.recv() if receive.poll(30) else ("nothing", "")
    child.join(10)
    print(f"\n== {ram_mib} MiB RAM, {data_mib} MiB data, guest rewriting {hot_mib} MiB; downtime-limit "
          f"{downtime_limit} ms, max-bandwidth {max_bandwidth / 1e6:g} MB/s ==")
    print("A row per pass (0: all of RAM), ended by a read of the dirty log: what the pass sent, its wall\n"
          "time, the source's CPU time, the part spent writing to the socket, the rate of those writes, then the engine's\n"
          "bandwidth estimate after it, the dirty pages the log read found and their expected downtime.")
    print(f"{'pass':>4} {'MiB':>6} {'pass ms':>8} {'cpu ms':>7} {'write ms':>8} {'write MB/s':>10} {'est MB/s':>8} "
          f"{'dirty':>7} {'exp ms':>7}")
    for row in rows[:-1] if outcome == "completed" else rows:
        print("{:>4} {:>6.1f} {:>8.1f} {:>7.1f} {:>8.1f} {:>10.1f} {:>8.1f} {:>7} {:>7.0f}".format(*row))
    ram_stats = stats["ram"]
    if outcome == "completed":
        final_bytes = channel.bytes_sent - at_pause["bytes"]
        rate = final_bytes / max(source.completed_at - source.paused_at, 1e-9) / 1e6
        same = "RAM identical" if word == "go" and digest == source.ram_digest() else f"RAM DIFFERS ({word})"
        print(f"completed: {ram_stats['dirty-sync-count']} passes, total {stats['total-time']} ms, downtime "
              f"{stats['downtime']} ms (expected {stats.get('expected-downtime')} ms); last pass "
              f"{source.last_sync_pages} pages, {final_bytes / 2**20:.1f} MiB at {rate:.0f} MB/s (pause to "
              f"LOADED), {final_cpu * 1000:.1f} ms of the source's CPU; {same}")
    else:
        print(f"{outcome}: {ram_stats['dirty-sync-count']} passes, {ram_stats['transferred'] / 2**20:.0f} MiB sent")
    source.close()


def send_cost(ram_mib: int, hot_mib: int, group: int, rounds: int = 7) -> None:
    """The source's CPU time for one dirty pass of the hot set (median of `rounds`), the guest
    running (pages copied before their crc) and paused (the switchover's pass), into a socket
    a child process drains: under nested virtualisation the CPU, not the link, bounds a pass."""
    ram = ram_mib << 20
    source = RewritingSource(ram, hot_pages=(hot_mib << 20) // 4096, group=group)
    a, b = socket.socketpair()
    drain = multiprocessing.get_context("fork").Process(target=_drain, args=(b, a), daemon=True)
    drain.start()
    b.close()
    channel = Channel(a)
    engine = Precopy(source, channel, {"downtime-limit": 300})
    writer = StreamWriter(channel, sparse=False)
    writer.write_header()
    source.tracker.start()
    figures = []
    for copy in (True, False):
        writer.copy_pages = copy
        cpu = []
        for _ in range(rounds):
            engine.remaining_pages = source.tracker.sync()
            started = time.process_time()
            engine._dirty_pass(writer)
            cpu.append(time.process_time() - started)
        figures.append(sorted(cpu)[rounds // 2])
    source.tracker.stop()
    a.close()
    drain.join(10)
    source.close()
    mb = (hot_mib << 20) / 1e6
    print(f"send cost, {hot_mib} MiB in runs of {group} page(s) of {ram_mib} MiB: running {figures[0] * 1000:.1f} ms "
          f"({mb / figures[0]:.0f} MB per CPU-s), paused {figures[1] * 1000:.1f} ms ({mb / figures[1]:.0f} MB per CPU-s)")


def _drain(sock: socket.socket, other_end: socket.socket) -> None:
    other_end.close()           # the parent's end: its close is then the end of the stream here
    while sock.recv(1 << 20):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ram-mib", type=int, default=512)
    parser.add_argument("--data-mib", type=int, default=128, help="non-zero RAM before the migration")
    parser.add_argument("--hot", default="4,32", help="MiB the guest keeps rewriting, one round each")
    parser.add_argument("--max-bandwidth", type=float, default=0.0, help="MB/s, 0: unlimited")
    parser.add_argument("--downtime-limit", type=int, default=300)
    parser.add_argument("--limit-s", type=float, default=60.0)
    parser.add_argument("--cost-only", action="store_true", help="only the send path's CPU cost per pass")
    args = parser.parse_args()
    for hot in (int(h) for h in args.hot.split(",")):
        for group in (1, 4, 64):
            send_cost(args.ram_mib, hot, group)
    if args.cost_only:
        return
    for hot in (int(h) for h in args.hot.split(",")):
        one_round(args.ram_mib, hot, args.data_mib, int(args.max_bandwidth * 1e6), args.limit_s,
                  args.downtime_limit)


if __name__ == "__main__":
    main()
