"""Dirty tracking for live migration: KVM's dirty log against its dirty ring, measured on one
guest in one run (issue 11: "measure both and keep the faster, saying why in the code").

The guest is tests/guest/hotset.elf: it rewrites 6144 pages (24 MiB) without pause, plus a
journal page every 64, as a guest rewriting memory during a migration does. While it runs, a
harvester thread collects the dirty set every `--period` ms (pre-copy's passes read it at about
that rate in L1) and each mechanism hands it back as what the pre-copy engine needs, one bool per
page of RAM, re-protected so the next write is seen again:

- none: no tracking; the guest's own rate, the baseline.
- log:  KVM_MEM_LOG_DIRTY_PAGES with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, as DirtyTracker does:
        KVM_GET_DIRTY_LOG, then KVM_CLEAR_DIRTY_LOG of the pages it reported (DirtyTracker clears
        them chunk by chunk before each chunk is sent; here all at once).
- ring: KVM_CAP_DIRTY_LOG_RING(_ACQ_REL), `--ring-entries` per vCPU (QEMU's dirty-ring-size,
        4096 by default there too): every published entry harvested (Vcpu.harvest_dirty_ring_arrays,
        one numpy pass), then KVM_RESET_DIRTY_RINGS. A vCPU whose ring fills exits with
        KVM_EXIT_DIRTY_RING_FULL and harvests its own ring before it runs on; QEMU's reaper
        thread does the same work from another thread while the vCPU waits for it.

Printed per mechanism: the guest's page writes a second (sweeps x 6144 over the measured time)
and that against `none`; harvests, pages a harvest, milliseconds a harvest (median and max)
and microseconds a page; and for the ring, its full exits and the time they held the vCPU.
The figures that decide: the guest's rate while tracked (the write faults' cost, which a
migration pays for every pass) and the harvest's cost (which the switchover pays inside its
downtime).

    python benchmarks/dirty_track_bench.py [--seconds 5] [--period 100] [--ring-entries 4096] [--modes none,log,ring]
"""
from __future__ import annotations

import argparse
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402

from kvmpy.boot.entry import apply_entry  # noqa: E402
from kvmpy.boot.loader import load_kernel  # noqa: E402
from kvmpy.devices.bus import Bus  # noqa: E402
from kvmpy.errors import KvmpyError  # noqa: E402
from kvmpy.ioctl import lib  # noqa: E402
from kvmpy.memslots import PAGE_SIZE, bitmap_to_pages  # noqa: E402
from kvmpy.vcpu.dispatch import ExitDispatcher  # noqa: E402
from kvmpy.vcpu.runner import KICK_SIGNAL, install_kick_signal  # noqa: E402
from support.tinyguest import GUEST_DIR, TinyTestVm  # noqa: E402

HOTSET = GUEST_DIR / "out" / "hotset.elf"
HOT_PAGES = 6144            # hotset.S's HOT_PAGES
SWEEP_GPA = 0x300000        # hotset.S's SWEEP: the last finished sweep
RAM_BYTES = 64 << 20        # hotset.S writes up to 56 MiB (its journal)
MODES = ("none", "log", "ring")


@dataclass
class Result:
    mode: str
    seconds: float = 0.0
    sweeps: int = 0
    harvest_ms: list[float] = field(default_factory=list)
    harvest_pages: list[int] = field(default_factory=list)
    ring_full: int = 0
    ring_full_ms: float = 0.0
    ring_full_pages: int = 0
    error: str = ""

    @property
    def writes_per_s(self) -> float:
        return self.sweeps * HOT_PAGES / self.seconds if self.seconds else 0.0


class Tracked:
    """The guest, its vCPU thread and one mechanism's harvest."""

    def __init__(self, mode: str, ring_entries: int):
        self.mode = mode
        self.npages = RAM_BYTES // PAGE_SIZE
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if mode != "none" else 0
        ring_bytes = ring_entries * 16 if mode == "ring" else 0
        self.tiny = TinyTestVm.create(mem_bytes=RAM_BYTES, slot_flags=flags, dirty_ring_bytes=ring_bytes)
        self.result = Result(mode)
        self.ring_lock = threading.Lock()       # the vCPU's ring-full harvest against the harvester's
        self.ring_pending = np.zeros(self.npages, dtype=bool)   # what ring-full exits collected
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run_vcpu, name="vcpu0", daemon=True)
        try:
            vcpu = self.tiny.vcpu
            entry = load_kernel(self.tiny.memory, str(HOTSET), "")
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            apply_entry(regs, sregs, entry)
            vcpu.set_sregs(sregs)
            vcpu.set_regs(regs)
            if mode == "log":
                self.tiny.vm.enable_manual_dirty_log_protect()
        except BaseException:
            self.tiny.close()
            raise

    def close(self) -> None:
        self.stop.set()
        vcpu = self.tiny.vcpu
        vcpu.run_struct.immediate_exit = 1
        while self.thread.is_alive():
            if self.thread.ident is not None:
                signal.pthread_kill(self.thread.ident, KICK_SIGNAL)
            self.thread.join(0.05)
        self.tiny.close()

    def sweeps(self) -> int:
        return int.from_bytes(self.tiny.memory.read(SWEEP_GPA, 4), "little")

    def _run_vcpu(self) -> None:
        vcpu = self.tiny.vcpu
        disp = ExitDispatcher(vcpu.run_map, Bus("pio", 1 << 16), Bus("mmio", 1 << 48))
        try:
            while not self.stop.is_set():
                if not vcpu.run():
                    continue
                if vcpu.exit_reason == lib.KVM_EXIT_DIRTY_RING_FULL:
                    started = time.perf_counter()
                    with self.ring_lock:
                        _, offsets = vcpu.harvest_dirty_ring_arrays()
                        self.ring_pending[offsets.astype(np.int64)] = True
                        self.tiny.vm.reset_dirty_rings()
                    self.result.ring_full += 1
                    if not len(offsets):
                        # KVM says full, yet nothing is published where the last harvest ended:
                        # it wrote past the entries not yet harvested (seen on PVM, which runs
                        # many guest writes between its full checks), so writes were lost.
                        self.result.error = ("the ring overflowed (a full exit, yet no entry "
                                             "published where the last harvest ended): dirty pages were lost")
                        return
                    self.result.ring_full_pages += len(offsets)
                    self.result.ring_full_ms += (time.perf_counter() - started) * 1000
                    continue
                if disp.dispatch():
                    self.result.error = f"the guest stopped: {disp.detail}"
                    return
        except KvmpyError as exc:
            self.result.error = str(exc)

    def harvest(self) -> np.ndarray:
        """The pages dirtied since the last harvest (bool per page), re-protected."""
        vm = self.tiny.vm
        if self.mode == "log":
            bitmap = vm.get_dirty_log(0, self.npages)
            dirty = np.zeros(self.npages, dtype=bool)
            pages = bitmap_to_pages(bitmap, self.npages)
            if pages.size:
                vm.clear_dirty_log(0, 0, self.npages, bitmap)    # exactly what GET reported
                dirty[pages] = True
            return dirty
        with self.ring_lock:
            _, offsets = self.tiny.vcpu.harvest_dirty_ring_arrays()
            dirty = self.ring_pending.copy()
            self.ring_pending[:] = False
            dirty[offsets.astype(np.int64)] = True
            vm.reset_dirty_rings()
        return dirty


def measure(mode: str, seconds: float, period_s: float, ring_entries: int) -> Result:
    tracked = Tracked(mode, ring_entries)
    result = tracked.result
    try:
        tracked.thread.start()
        deadline = time.monotonic() + 60
        while tracked.sweeps() < 2 and not result.error:        # past its start, the pages touched
            if time.monotonic() > deadline:
                result.error = "the guest finished no sweep in 60 s"
                return result
            time.sleep(0.01)
        if mode != "none":
            tracked.harvest()               # from a clean set
        started, first = time.monotonic(), tracked.sweeps()
        while time.monotonic() - started < seconds and not result.error:
            time.sleep(period_s)
            if mode == "none":
                continue
            t0 = time.perf_counter()
            dirty = tracked.harvest()
            result.harvest_ms.append((time.perf_counter() - t0) * 1000)
            result.harvest_pages.append(int(np.count_nonzero(dirty)))
        result.seconds = time.monotonic() - started
        result.sweeps = tracked.sweeps() - first
        return result
    finally:
        tracked.close()


def report(results: list[Result], period_ms: float, ring_entries: int) -> None:
    base = next((r.writes_per_s for r in results if r.mode == "none" and not r.error), 0.0)
    print(f"\ndirty tracking, hotset guest ({HOT_PAGES} pages rewritten), harvest every {period_ms:g} ms, "
          f"ring of {ring_entries} entries")
    print(f"{'mode':<5} {'page writes/s':>13} {'vs none':>7} {'harvests':>8} {'pages/harvest':>13} "
          f"{'ms/harvest':>10} {'max ms':>7} {'us/page':>7}  ring-full exits")
    for r in results:
        if r.error:
            print(f"{r.mode:<5} failed: {r.error}")
            continue
        rel = f"{r.writes_per_s / base:.2f}x" if base else "-"
        if r.harvest_ms:
            med_ms, med_pages = statistics.median(r.harvest_ms), statistics.median(r.harvest_pages)
            per_page = sum(r.harvest_ms) * 1000 / max(sum(r.harvest_pages), 1)
            harvest = (f"{len(r.harvest_ms):>8} {med_pages:>13.0f} {med_ms:>10.2f} {max(r.harvest_ms):>7.2f} "
                       f"{per_page:>7.2f}")
        else:
            harvest = f"{'-':>8} {'-':>13} {'-':>10} {'-':>7} {'-':>7}"
        full = (f"  {r.ring_full} ({r.ring_full_pages} pages, {r.ring_full_ms:.0f} ms)" if r.mode == "ring" else "")
        print(f"{r.mode:<5} {r.writes_per_s:>13.0f} {rel:>7} {harvest}{full}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="measured time per mechanism")
    ap.add_argument("--period", type=float, default=100.0, help="ms between harvests")
    ap.add_argument("--ring-entries", type=int, default=4096, help="dirty ring entries per vCPU (a power of 2)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    ap.add_argument("--rounds", type=int, default=1, help="each mechanism this many times, interleaved")
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        print(f"dirty_track_bench: unknown mode {bad[0]!r} (known: {', '.join(MODES)})", file=sys.stderr)
        return 2
    if not HOTSET.exists():
        print(f"dirty_track_bench: {HOTSET} is missing (make guests)", file=sys.stderr)
        return 2
    install_kick_signal()
    results = []
    for _ in range(args.rounds):
        for mode in modes:
            try:
                results.append(measure(mode, args.seconds, args.period / 1000, args.ring_entries))
            except KvmpyError as exc:
                results.append(Result(mode, error=str(exc)))
            print(f"  {mode}: done", file=sys.stderr, flush=True)
    report(results, args.period, args.ring_entries)
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
