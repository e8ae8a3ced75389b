"""Snapshot (static migration) cost, kvmpy vs QEMU, same kernel, initrd and guest, in one run.

For each guest size: boot a stock Linux guest printing a tick every 0.5 s, save it once it ticks
(kvmpy: the in-process API's `save("file:...")`; QEMU: QMP `migrate "exec:cat > FILE"`), then
restore it in a new process (kvmpy: `--incoming file:FILE`; QEMU: `-incoming "exec:cat FILE"`)
and time process start -> the guest's next console line. kvmpy also reports its own stream start
-> first KVM_RUN. Prints a table. Needs hardware-style /dev/kvm: `make bench-snapshot` runs it in
the nested harness on a PVM host.

    python benchmarks/snapshot_bench.py [--sizes 512M,2G]
"""
from __future__ import annotations

import argparse
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmpy.nested import tier2  # noqa: E402
from kvmpy.nested.images import build_guest_initramfs  # noqa: E402
from kvmpy.nested.kernel import unpack  # noqa: E402

APPEND = "console=ttyS0 panic=-1 quiet"
SCRIPT = 'i=0; while true; do echo "KVMPY-TICK $i"; i=$((i+1)); sleep 0.5; done\n'
TICK = re.compile(rb"KVMPY-TICK (\d+)")
RESTORED = re.compile(rb"restored from \S+ in ([0-9.]+) ms")


def size_mib(text: str) -> int:
    return int(text[:-1]) * (1024 if text.endswith("G") else 1)


class Lines:
    """A child's merged stdout/stderr, searched as it arrives."""

    def __init__(self, argv: list[str]):
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.buf = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def wait_for(self, rx: re.Pattern, timeout: float, after: int = 0) -> tuple[re.Match, float]:
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf, after)
            if m:
                return m, time.monotonic() - self.start
            if time.monotonic() > deadline or self.proc.poll() is not None and not self.sel.select(0):
                raise RuntimeError(f"no {rx.pattern!r} in time; output tail: {self.buf[-800:]!r}")
            if self.sel.select(0.2):
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                self.buf += chunk

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait(10)
        self.sel.close()
        self.proc.stdout.close()


def kvmpy_round(kernel: Path, initrd: Path, append: str, mem: str, workdir: Path) -> dict:
    from kvmpy import Machine
    snap = workdir / "kvmpy.snap"
    with Machine(kernel=str(kernel), initrd=str(initrd), append=append, memory=mem) as m:
        m.start()
        m.console.expect(rb"KVMPY-TICK 2\r?\n", timeout=240)
        t0 = time.monotonic()
        m.save(f"file:{snap}")
        save_s = time.monotonic() - t0
        last_tick = int(TICK.findall(m.console.data)[-1])
    st = snap.stat()
    argv = [sys.executable, "-m", "kvmpy", "--log-level", "info", "boot", "--incoming", f"file:{snap}",
            "--serial", "stdio", "-m", mem, "--kernel", str(kernel), "--initrd", str(initrd), "--append", append]
    child = Lines(argv)
    try:
        restored, _ = child.wait_for(RESTORED, 120)
        tick, next_line_s = child.wait_for(TICK, 120)
    finally:
        child.kill()
    assert int(tick.group(1)) == last_tick + 1, f"tick {tick.group(1)} after {last_tick}"
    snap.unlink()
    return {"save_s": save_s, "allocated": st.st_blocks * 512, "size": st.st_size,
            "to_kvm_run_ms": float(restored.group(1)), "next_line_s": next_line_s}


def qemu_round(kernel: Path, initrd: Path, append: str, mem: str, workdir: Path) -> dict:
    from kvmpy.monitor.client import QmpClient
    snap, sock = workdir / "qemu.snap", workdir / "qemu.qmp"
    base = tier2.qemu_guest_argv(kernel, initrd, append, memory_mib=size_mib(mem))
    src = Lines(base + ["-qmp", f"unix:{sock},server=on,wait=off"])
    try:
        m, _ = src.wait_for(TICK, 240, after=0)
        src.wait_for(re.compile(rb"KVMPY-TICK 2\r?\n"), 240)
        with QmpClient(str(sock)) as qmp:
            t0 = time.monotonic()
            qmp.execute("migrate", {"uri": f"exec:cat > {snap}"})
            while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed"):
                time.sleep(0.02)
            save_s = time.monotonic() - t0
        if info["status"] != "completed":
            raise RuntimeError(f"QEMU's migration failed: {info}")
        last_tick = int(TICK.findall(src.buf)[-1])
    finally:
        src.kill()
    st = snap.stat()
    child = Lines(base + ["-incoming", f"exec:cat {snap}"])
    try:
        tick, next_line_s = child.wait_for(TICK, 120)
    finally:
        child.kill()
    snap.unlink()
    return {"save_s": save_s, "allocated": st.st_blocks * 512, "size": st.st_size,
            "to_kvm_run_ms": None, "next_line_s": next_line_s, "downtime_ms": info.get("downtime"),
            "tick_ok": int(tick.group(1)) >= last_tick}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="512M,2G")
    args = ap.parse_args()
    kernel = unpack()
    initrd = build_guest_initramfs(kernel)
    append = f"{APPEND} {tier2.test_script_arg(SCRIPT)}"
    rows = []
    with tempfile.TemporaryDirectory(prefix="kvmpy-snapbench-") as tmp:
        for mem in args.sizes.split(","):
            for vmm, fn in (("kvmpy", kvmpy_round), ("qemu", qemu_round)):
                r = fn(kernel.bzimage, initrd, append, mem, Path(tmp))
                print(f"{mem:>5s} {vmm:6s} {r}", flush=True)
                rows.append((mem, vmm, r))
    print(f"\nsnapshot save/restore, kernel {kernel.release} (one round each; times in L1 when nested)")
    print(f"{'RAM':>5s} {'vmm':6s} {'save s':>7s} {'file MiB':>9s} {'on disk MiB':>12s} "
          f"{'stream->KVM_RUN ms':>19s} {'start->next line s':>19s}")
    for mem, vmm, r in rows:
        run = f"{r['to_kvm_run_ms']:.1f}" if r["to_kvm_run_ms"] is not None else "-"
        print(f"{mem:>5s} {vmm:6s} {r['save_s']:7.2f} {r['size'] / 2**20:9.1f} {r['allocated'] / 2**20:12.1f} "
              f"{run:>19s} {r['next_line_s']:19.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
