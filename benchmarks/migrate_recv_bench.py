"""The live-migration destination's receive rate, without KVM: a writer process streams pages
of a RAM range over a unix socket pair in the live (run) layout, and this process reads them with
kvmpy's StreamReader into a RAM-sized buffer, as `--incoming unix:` does, and times it.

Why its own script: the 32 MiB workload of `make bench-migrate` did not converge in L1 because
the destination took the pages in at ~13 MB/s; this measures that path alone, on any host.

The stream mixes what live migration sends: a first pass of runs of non-zero pages (a quarter of
the pages zero, skipped), then dirty passes of scattered single pages and short runs, with zero
runs among them, each pass followed by SYNC (answered, as the destination does).

    python benchmarks/migrate_recv_bench.py [--mib 256] [--rounds 3] [--compress]
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmpy.migrate.pages import PAGE_SIZE  # noqa: E402
from kvmpy.migrate.precopy import receive_memory_and_state  # noqa: E402
from kvmpy.migrate.reader import StreamReader  # noqa: E402
from kvmpy.migrate.stream import SectionKind, StreamWriter  # noqa: E402

GPA = 0x100000


def source_ram(mib: int, seed: int = 11) -> np.ndarray:
    """RAM with a quarter of its pages zero, the rest random words."""
    rng = np.random.default_rng(seed)
    pages = mib << 8
    ram = rng.integers(0, 1 << 63, size=pages * PAGE_SIZE // 8, dtype=np.uint64).view(np.uint8)
    zero = rng.random(pages) < 0.25
    ram.reshape(pages, PAGE_SIZE)[zero] = 0
    return ram


def dirty_passes(pages: int, seed: int = 12) -> list[list[tuple[int, int]]]:
    """Three passes of scattered dirty pages: singles and short runs, sorted, not overlapping."""
    rng = np.random.default_rng(seed)
    passes = []
    for fraction in (0.25, 0.1, 0.02):
        mask = rng.random(pages) < fraction
        mask |= np.roll(mask, 1) & (rng.random(pages) < 0.5)      # some runs of two and more
        edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        passes.append(list(zip(starts.tolist(), (ends - starts).tolist())))
    return passes


def write_stream(sock: socket.socket, ram: np.ndarray, passes: list, compress: bool) -> None:
    """The source's side, in the child process."""
    class Out:                              # a file object over the socket, as Channel is
        def write(self, data):
            sock.sendall(data)
            return memoryview(data).nbytes

        def flush(self):
            pass

        def fileno(self):
            return sock.fileno()

        def seekable(self):
            return False

        def tell(self):
            return 0

    writer = StreamWriter(Out(), sparse=False)
    writer.compress = compress
    writer.write_header()
    writer.write_memory([(GPA, ram)])
    for number, page_runs in enumerate(passes, 1):
        writer.write_pages(GPA, ram, page_runs)
        writer.write_sync(number)
        assert sock.recv(64) == b"S"
    writer.write_section(SectionKind.STATE, b"\x00" * 64)
    writer.finish()


def one_round(mib: int, compress: bool) -> tuple[float, float, float, int]:
    """(wall seconds, the reader's CPU seconds, the writer's CPU seconds, stream bytes)."""
    ram = source_ram(mib)
    passes = dirty_passes(ram.size // PAGE_SIZE)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    child = os.fork()
    if child == 0:
        ours.close()
        try:
            write_stream(theirs, ram, passes, compress)
            theirs.shutdown(socket.SHUT_WR)
            os._exit(0)
        except BaseException as exc:    # noqa: BLE001 - the child reports and exits
            print(f"writer: {exc!r}", file=sys.stderr)
            os._exit(1)
    theirs.close()
    target = np.zeros_like(ram)
    target[:] = 0                           # faulted in before the clock starts, as a warm guest's RAM
    started, cpu_started = time.perf_counter(), time.process_time()
    stream = ours.makefile("rb")
    reader = StreamReader(stream)
    receive_memory_and_state(reader, [(GPA, target)], on_sync=lambda: ours.sendall(b"S"))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    received = reader._pos
    stream.close()
    ours.close()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    _, status = os.waitpid(child, 0)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    writer_cpu = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    if status:
        raise SystemExit("the writer failed")
    if zlib.crc32(target) != zlib.crc32(ram):
        raise SystemExit("the received RAM differs from the source's")
    return elapsed, cpu, writer_cpu, received


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--compress", action="store_true")
    args = ap.parse_args()
    rates, cpu_rates = [], []
    for _ in range(args.rounds):
        elapsed, cpu, writer_cpu, received = one_round(args.mib, args.compress)
        rates.append(received / elapsed / 1e6)
        cpu_rates.append(received / max(cpu, 1e-6) / 1e6)
        print(f"{received / 2**20:.1f} MiB of stream in {elapsed * 1000:.0f} ms: {rates[-1]:.0f} MB/s; "
              f"reader CPU {cpu * 1000:.0f} ms ({cpu_rates[-1]:.0f} MB per CPU-second), writer CPU "
              f"{writer_cpu * 1000:.0f} ms", flush=True)
    print(f"receive, {args.mib} MiB RAM, unix socket{' (zstd)' if args.compress else ''}: wall best "
          f"{max(rates):.0f} MB/s, median {sorted(rates)[len(rates) // 2]:.0f}; reader's CPU: best "
          f"{max(cpu_rates):.0f} MB/s, median {sorted(cpu_rates)[len(cpu_rates) // 2]:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
