"""Host CPU per virtio-blk request, pure-Python data path vs the C one (no /dev/kvm needed).

Why: in the nested harness Python runs ~10x slower than here, so per-request CPU decides
virtio-blk throughput there; this measures it directly. The mock driver lays out a queue in a
GuestMemory and publishes one prepared request at a time (queue depth 1, like blk_bench's guest);
only the device's side (notify -> used ring) is timed. Requests are reads of a temporary,
page-cached image, so the figures are CPU cost (including the kernel's copy), not disk speed.

    python benchmarks/vq_bench.py [--iterations N] [--rounds R] [--cache none]
"""
from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.mock_driver

from kvmpy.devices.virtio import fastpath  # noqa: E402
from kvmpy.devices.virtio.blk import T_IN, DriveSpec, VirtioBlk  # noqa: E402
from support.mock_driver import BumpAllocator, MockPciDriver, MockQueue  # noqa: E402
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE  # noqa: E402
from kvmpy.devices.virtio.transport import VirtioPciDevice  # noqa: E402
from kvmpy.memslots import GuestMemory  # noqa: E402

RAM = 32 << 20
IMAGE_MIB = 64
HDR, STATUS, TABLE = 0x100000, 0x100100, 0x101000
DATA = 0x200000             # data pages from here, every other page (not physically contiguous)


def big_segments() -> list[tuple[int, int]]:
    """1 MiB in 254 segments, as Linux sends it with seg_max 254: 252 pages and two 8 KiB runs."""
    sizes = [8192, 8192] + [4096] * 252
    out, addr = [], DATA
    for n in sizes:
        out.append((addr, n))
        addr += n + 4096
    return out


class Rig:
    """One device on one data path with one prepared request, republished on every `run`."""

    def __init__(self, image: str, fast: bool, cache: str, segs: list[tuple[int, int]]):
        self.mem = GuestMemory.create(RAM)
        saved, fastpath.ENABLED = fastpath.ENABLED, fast  # the transport's queues follow the switch
        try:
            self.blk = VirtioBlk(DriveSpec(image, readonly=True, cache=cache), fast=fast)  # shared lock
            self.dev = VirtioPciDevice(self.blk, self.mem)
        finally:
            fastpath.ENABLED = saved
        drv = MockPciDriver(self.dev, self.mem, BumpAllocator(0x10000, HDR))
        (self.q,) = drv.start(1)
        chain = [(HDR, 16, False)] + [(a, n, True) for a, n in segs] + [(STATUS, 1, True)]
        self.head = self._prepare(self.q, chain)
        self.sectors = sum(n for _, n in segs) // 512

    @staticmethod
    def _prepare(q: MockQueue, chain: list[tuple[int, int, bool]]) -> int:
        """Write the chain once (indirect when long, as Linux does); `run` only republishes it."""
        indirect = len(chain) > 3
        for i, (a, n, w) in enumerate(chain):
            flags = (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(chain) else 0)
            q.write_desc(i, a, n, flags, i + 1, table=TABLE if indirect else None)
        if indirect:
            q.write_desc(0, TABLE, 16 * len(chain), VIRTQ_DESC_F_INDIRECT)
        return 0

    def run(self, iterations: int, span_sectors: int) -> float:
        """Mean seconds per request, device side only, sectors walking through the image."""
        mem, q, notify = self.mem, self.q, self.dev.handle_notify
        step = self.sectors
        total = 0.0
        sector = 0
        for _ in range(iterations):
            mem.write(HDR, struct.pack("<IIQ", T_IN, 0, sector))
            q.publish(self.head)
            t0 = time.perf_counter()
            notify(0)
            total += time.perf_counter() - t0
            q.last_used = (q.last_used + 1) & 0xFFFF
            if mem.read(STATUS, 1) != b"\x00":
                raise SystemExit(f"request failed (status {mem.read(STATUS, 1)[0]})")
            sector = (sector + step) % (span_sectors - step + 1)
        return total / iterations

    def close(self) -> None:
        self.blk.close()
        self.mem.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=400, help="requests per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="measurements per figure (median shown)")
    ap.add_argument("--cache", choices=("writeback", "none"), default="writeback")
    args = ap.parse_args()
    if not fastpath.AVAILABLE:
        print("vq_bench: kvmpy.ioctl._kvm has no C data path; rebuild it (pip install -e .)", file=sys.stderr)
        return 2
    shapes = {"1 MiB read, 254 segments": big_segments(), "4 KiB read, 1 segment": [(DATA, 4096)]}
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/var/tmp")) as tmp:
        image = os.path.join(tmp, "vq_bench.img")
        with open(image, "wb") as f:
            for _ in range(IMAGE_MIB):
                f.write(os.urandom(1 << 20))
        span = (IMAGE_MIB << 20) // 512
        print(f"virtio-blk request cost on this host, device side, queue depth 1, cache={args.cache} "
              f"({IMAGE_MIB} MiB image{', page-cached' if args.cache == 'writeback' else ''}); "
              f"median of {args.rounds} x {args.iterations} requests")
        print(f"{'request':28s} {'python us':>10s} {'C us':>8s} {'speedup':>8s}")
        for name, segs in shapes.items():
            samples: dict[bool, list[float]] = {False: [], True: []}
            rigs = {fast: Rig(image, fast, args.cache, segs) for fast in (False, True)}
            try:
                for r in rigs.values():
                    r.run(20, span)  # warm up (page cache, branch predictors)
                for _ in range(args.rounds):  # interleaved, so load changes hit both alike
                    for fast, r in rigs.items():
                        samples[fast].append(r.run(args.iterations, span))
                med = {fast: statistics.median(v) for fast, v in samples.items()}
                assert rigs[True].blk._cblk.completed > 0, "the C rig did not use the C loop"
            finally:
                for r in rigs.values():
                    r.close()
            print(f"{name:28s} {med[False] * 1e6:10.1f} {med[True] * 1e6:8.1f} {med[False] / med[True]:7.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
