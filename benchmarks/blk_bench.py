"""virtio-blk read performance, kvmpy vs QEMU, each with cache=writeback and cache=none.

The guest (stock Debian kernel, busybox initramfs with benchmarks/out/blkbench baked in) reads
its virtio disk with O_DIRECT: sequential 1 MiB reads (MB/s) and 4 KiB random reads at queue
depth 1 (IOPS), each for a fixed time, every block's tag checked. Every VMM gets the same
kernel, initrd, command line and disk; rounds are interleaved so load changes hit all alike; the
table shows medians and each kvmpy mode as a percentage of each QEMU mode. Goals: sequential at
least QEMU's, 4 KiB IOPS at least 70% of QEMU's (same cache mode).

The disk is a 256 MiB raw image of tagged pseudo-random data cached under .cache/nested. On a
PVM host run it through the harness, which attaches the image as L1's /dev/vda (a block device
supports O_DIRECT, which QEMU's cache=none needs and L1's 9p/tmpfs lack):

    python benchmarks/blk_bench.py --prepare          # host: image, blkbench, initrd; prints image
    python -m kvmpy.nested run --disk IMG -- python benchmarks/blk_bench.py --rounds 3
    make bench-blk                                    # both steps
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmpy.errors import NestedError  # noqa: E402
from kvmpy.nested import tier2  # noqa: E402
from kvmpy.nested.images import build_guest_initramfs, images_dir  # noqa: E402
from kvmpy.nested.kernel import KernelPackage, cache_root, unpack  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
BLOCK = 4096
TAG_MAGIC = 0x6B766D7079626C6B   # blkbench.c's TAG_MAGIC: block i starts with i ^ TAG_MAGIC
IMAGE_SEED = 20240505
IMAGE_VERSION = 1
APPEND = "console=ttyS0 panic=-1 quiet"
VMMS = ("kvmpy-writeback", "kvmpy-none", "qemu-writeback", "qemu-none")
GUEST_SCRIPT = """\
chmod 755 /bin/blkbench
for d in /sys/block/vd*; do echo "KVMPY-BLK $d $(cat $d/size) $(cat $d/queue/scheduler)"; done
/bin/blkbench seq /dev/vda {seq_s} || exit 1
/bin/blkbench rand /dev/vda {rand_s} || exit 1
"""
RESULT_RE = re.compile(r"BLKBENCH (seq|rand) bytes=(\d+) ios=(\d+) secs=([\d.]+) "
                       r"mbps=([\d.]+) iops=([\d.]+) bad=(\d+)")


def build_image(mib: int) -> Path:
    """The tagged test image, made once (atomically: host and L1 share the cache)."""
    out = images_dir() / f"blkbench-{mib}M-v{IMAGE_VERSION}.raw"
    if out.is_file() and out.stat().st_size == mib << 20:
        return out
    import numpy as np
    out.parent.mkdir(parents=True, exist_ok=True)
    chunk_blocks = 4096  # 16 MiB per write
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    with os.fdopen(fd, "wb") as f:
        for first in range(0, (mib << 20) // BLOCK, chunk_blocks):
            rng = np.random.default_rng([IMAGE_SEED, first])
            data = rng.integers(1, 256, size=chunk_blocks * BLOCK, dtype=np.uint8)
            tags = data.view("<u8").reshape(chunk_blocks, BLOCK // 8)
            tags[:, 0] = np.arange(first, first + chunk_blocks, dtype=np.uint64) ^ np.uint64(TAG_MAGIC)
            f.write(data.tobytes())
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
    return out


def blkbench_binary() -> Path:
    """benchmarks/out/blkbench, (re)built by benchmarks/Makefile when its source changed."""
    r = subprocess.run(["make", "-s", "-C", str(BENCH_DIR), "out/blkbench"], capture_output=True,
                       text=True, timeout=300)
    binary = BENCH_DIR / "out" / "blkbench"
    if r.returncode != 0 or not binary.is_file():
        raise NestedError("building blkbench", detail=(r.stderr or r.stdout).strip()[-2000:])
    return binary


def guest_initrd(kernel: KernelPackage) -> Path:
    return build_guest_initramfs(kernel, files={"bin/blkbench": blkbench_binary()})


def argv_for(vmm: str, kernel: Path, initrd: Path, append: str, disk: str) -> list[str]:
    """`vmm` is kvmpy-<cache> or qemu-<cache>; both VMMs get 512 MiB, one vCPU, one disk."""
    cache = vmm.split("-", 1)[1]
    if vmm.startswith("kvmpy"):
        return [sys.executable, "-m", "kvmpy", "boot", "--kernel", str(kernel), "--initrd", str(initrd),
                "--append", append, "--serial", "stdio", "--no-reboot", "-m", "512M",
                "--drive", f"file={disk}" + (",cache=none" if cache == "none" else "")]
    return tier2.qemu_guest_argv(kernel, initrd, append, machine="pc", extra=[
        "-drive", f"file={disk},format=raw,if=none,id=d0,cache={cache}",
        "-device", "virtio-blk-pci,drive=d0"])


@dataclass
class Sample:
    seq_mbps: float
    rand_iops: float


def parse_results(output: str) -> Sample | None:
    """Both result lines, with no bad blocks, or None."""
    found = {m.group(1): m for m in RESULT_RE.finditer(output)}
    if set(found) != {"seq", "rand"} or any(int(m.group(7)) for m in found.values()):
        return None
    return Sample(float(found["seq"].group(5)), float(found["rand"].group(6)))


def resolve_disk(arg: str | None, image: Path) -> str:
    """The path every VMM opens: --disk, the harness's L1 disk, or (hardware KVM) the image."""
    disk = arg or os.environ.get("KVMPY_NESTED_DISK") or str(image)
    try:
        fd = os.open(disk, os.O_RDONLY)
    except OSError as e:
        raise NestedError("opening the benchmark disk", errno=e.errno, detail=disk) from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        head = os.pread(fd, 8, 0)
    finally:
        os.close(fd)
    if size != image.stat().st_size or int.from_bytes(head, "little") != TAG_MAGIC:
        raise NestedError("checking the benchmark disk",
                          detail=f"{disk} ({size} bytes) does not hold {image.name}; run it via "
                                 "`make bench-blk` or pass the image with --disk")
    return disk


def warm_page_cache(disk: str) -> None:
    """Read the disk once so buffered VMMs (kvmpy, writeback) start from the same warm cache."""
    fd = os.open(disk, os.O_RDONLY)
    try:
        while os.read(fd, 1 << 20):
            pass
    finally:
        os.close(fd)


def pct(a: float, b: float) -> str:
    return f"{100 * a / b:5.0f}%" if b else "   n/a"


def print_table(results: dict[str, list[Sample]], rounds: int, kernel: KernelPackage, mib: int,
                seq_s: float, rand_s: float) -> None:
    med = {v: Sample(statistics.median(s.seq_mbps for s in results[v]),
                     statistics.median(s.rand_iops for s in results[v])) for v in results}
    print(f"\nvirtio-blk reads in the guest (O_DIRECT), median of {rounds} rounds, kernel "
          f"{kernel.release}, {mib} MiB raw disk, seq 1 MiB x {seq_s:g}s, rand 4 KiB QD1 x {rand_s:g}s")
    print(f"{'vmm':16s} {'seq MB/s':>9s} {'4k IOPS':>9s}")
    for vmm, m in med.items():
        print(f"{vmm:16s} {m.seq_mbps:9.1f} {m.rand_iops:9.0f}")
    kvmpys = [v for v in med if v.startswith("kvmpy")]
    qemus = [v for v in med if v.startswith("qemu")]
    if kvmpys and qemus:
        print(f"\n{'kvmpy as % of':16s} " + " ".join(f"{q + ' seq':>20s} {'IOPS':>6s}" for q in qemus))
        for k in kvmpys:
            print(f"{k:16s} " + " ".join(f"{pct(med[k].seq_mbps, med[q].seq_mbps):>20s} "
                                         f"{pct(med[k].rand_iops, med[q].rand_iops):>6s}" for q in qemus))
        for k in kvmpys:
            q = "qemu-" + k.split("-", 1)[1]
            if q in med:
                seq_ok = med[k].seq_mbps >= med[q].seq_mbps
                iops_ok = med[k].rand_iops >= 0.7 * med[q].rand_iops
                print(f"goals {k} vs {q}: seq >= 100% {'met' if seq_ok else 'MISSED'}, "
                      f"4k IOPS >= 70% {'met' if iops_ok else 'MISSED'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true",
                    help="build the image, blkbench and the initrd; print the image path")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-mib", type=int, default=256)
    ap.add_argument("--seq-seconds", type=float, default=5.0)
    ap.add_argument("--rand-seconds", type=float, default=5.0)
    ap.add_argument("--vmms", default=",".join(VMMS))
    ap.add_argument("--disk", help="what the VMMs open (default: $KVMPY_NESTED_DISK or the image)")
    args = ap.parse_args()
    vmms = args.vmms.split(",")
    if not set(vmms) <= set(VMMS) or not 16 <= args.image_mib <= 4096 or args.rounds < 1:
        ap.error(f"--vmms from {','.join(VMMS)}, --image-mib 16..4096, --rounds >= 1")
    kernel = unpack()
    image = build_image(args.image_mib)
    initrd = guest_initrd(kernel)
    if args.prepare:
        print(image)
        return 0
    if (blocked := tier2.tests_can_run_here()) is not None:
        print(f"blk_bench: {blocked.reason}", file=sys.stderr)
        return 2
    disk = resolve_disk(args.disk, image)
    warm_page_cache(disk)
    script = GUEST_SCRIPT.format(seq_s=args.seq_seconds, rand_s=args.rand_seconds)
    append = f"{APPEND} {tier2.test_script_arg(script)}"
    log_dir = cache_root() / "logs"
    results: dict[str, list[Sample]] = {v: [] for v in vmms}
    for rnd in range(args.rounds):
        for vmm in vmms:
            run = tier2.run_guest(argv_for(vmm, kernel.bzimage, initrd, append, disk), timeout_s=300,
                                  log_path=log_dir / f"blkbench-{vmm}-r{rnd + 1}.log")
            sample = parse_results(run.output) if run.test_rc == 0 else None
            if sample is None:
                print(f"round {rnd + 1} {vmm}: FAILED (status {run.exit_status}, test rc {run.test_rc})")
                print(run.tail(30), file=sys.stderr)
                return 1
            print(f"round {rnd + 1} {vmm:15s} seq {sample.seq_mbps:8.1f} MB/s  "
                  f"4k {sample.rand_iops:7.0f} IOPS  ({run.elapsed_s:.1f}s)", flush=True)
            results[vmm].append(sample)
    print_table(results, args.rounds, kernel, args.image_mib, args.seq_seconds, args.rand_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
