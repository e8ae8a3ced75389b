"""Boot time, kvmpy vs QEMU, on the same kernel, initrd and command line, in one run.

Measures process start -> the guest init's KVMPY-INIT-START marker (and -> process exit) for
`kvmpy boot`, `qemu -M pc -kernel` and `qemu -M microvm`, several rounds interleaved so load
changes hit every VMM alike, and prints a table of medians. Needs hardware-style /dev/kvm: on a
PVM host run it through the harness (`make bench-boot`).

    python benchmarks/boot_time.py [--rounds 3] [--smp 1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmpy.nested import tier2  # noqa: E402
from kvmpy.nested.images import build_guest_initramfs  # noqa: E402
from kvmpy.nested.kernel import unpack  # noqa: E402

APPEND = "console=ttyS0 panic=-1 quiet"
SCRIPT = "echo KVMPY-BENCH-DONE\n"


def argv_for(vmm: str, kernel: Path, initrd: Path, append: str, smp: int) -> list[str]:
    if vmm == "kvmpy":
        return [sys.executable, "-m", "kvmpy", "boot", "--kernel", str(kernel), "--initrd", str(initrd),
                "--append", append, "--serial", "stdio", "--no-reboot", "-m", "512M", "--smp", str(smp)]
    machine = vmm.split("-", 1)[1]
    # microvm has no i8042 to reboot through: reboot=t (triple fault) ends it, as QEMU users do.
    extra = " reboot=t" if machine == "microvm" else ""
    return tier2.qemu_guest_argv(kernel, initrd, append + extra, machine=machine, cpus=smp)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--vmms", default="kvmpy,qemu-pc,qemu-microvm")
    args = ap.parse_args()
    kernel = unpack()
    initrd = build_guest_initramfs(kernel)
    append = f"{APPEND} {tier2.test_script_arg(SCRIPT)}"
    vmms = args.vmms.split(",")
    init: dict[str, list[float]] = {v: [] for v in vmms}
    total: dict[str, list[float]] = {v: [] for v in vmms}
    for rnd in range(args.rounds):
        for vmm in vmms:
            run = tier2.run_guest(argv_for(vmm, kernel.bzimage, initrd, append, args.smp), timeout_s=240)
            ok = run.init_s is not None and "KVMPY-BENCH-DONE" in run.output
            print(f"round {rnd + 1} {vmm:13s} init {run.init_s or float('nan'):6.2f}s  "
                  f"exit {run.elapsed_s:6.2f}s  status {run.exit_status}{'' if ok else '  FAILED'}",
                  flush=True)
            if not ok:
                print(run.tail(30), file=sys.stderr)
                return 1
            init[vmm].append(run.init_s)
            total[vmm].append(run.elapsed_s)
    print(f"\nboot time, median of {args.rounds} (process start -> init marker / -> exit), "
          f"kernel {kernel.release}, smp {args.smp}")
    print(f"{'vmm':14s} {'init s':>8s} {'exit s':>8s}")
    for vmm in vmms:
        print(f"{vmm:14s} {statistics.median(init[vmm]):8.2f} {statistics.median(total[vmm]):8.2f}")
    fastest_qemu = min(statistics.median(init[v]) for v in vmms if v.startswith("qemu"))
    if "kvmpy" in vmms:
        print(f"kvmpy / fastest QEMU (init): {statistics.median(init['kvmpy']) / fastest_qemu:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
