"""Live migration, kvmpy vs QEMU, same guest and workload, between two "hosts" in one run.

The two hosts are two network namespaces joined by a veth pair with link-local addresses
(169.254.77.1 and .2), as issue 11 asks; each VMM's source runs in one and its destination in
the other, and the migration goes over tcp: between them. For each workload — an idle guest, and
a guest rewriting 4 MiB and 32 MiB of memory continuously (benchmarks/dirtier.c, static, in the
guest's initramfs) — boot the source with a QMP socket, wait for its ticks, start the
destination with `--incoming tcp:` (`-incoming` for QEMU), set the same downtime-limit and
max-bandwidth on both, `migrate`, poll `query-migrate` until it completes, and check that the
destination's console goes on ticking (and a dirtier still runs). Prints total time, downtime, bytes sent and passes, and
the ratios against the goals (downtime no longer than QEMU's, total time <= 1.2x QEMU's).

The workload `block` is block migration (local storage): an idle guest with a virtio-blk disk of
--disk-mib MiB of random data on the source's side and an empty sparse image of the same size
on the destination's, migrated with the `block` capability (QEMU's too); the round checks that
the destination's image ends equal to the source's, and reports the disk copy rate (the disk's
bytes over the migration's total time).

Two downtimes, because the VMMs count theirs differently: "downtime" is each one's own figure
(QEMU's query-migrate stops its clock once the source has sent everything, before the destination
has loaded a byte; kvmpy's runs until the destination confirms it loaded the guest), and "paused"
is what the guest lives through, measured the same way for both from outside: the source's STOP
event to the destination's RESUME event (QMP timestamps, one clock: both run in the same L1).
Needs hardware-style /dev/kvm and root (namespaces): `make bench-migrate` runs it in L1.

    python benchmarks/migrate_bench.py [--workloads idle,4,32,block] [--memory 512] [--disk-mib 256]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "tier2"))

from migrate_ticks import WHOLE_TICK, continuation_problem  # noqa: E402
from netns import TwoHosts, in_ns, wait_listening  # noqa: E402  (tier 2's two hosts)
from snapshot_bench import Lines  # noqa: E402

from kvmpy.migrate.precopy import SOURCE_DOWNTIME_LOGGED  # noqa: E402
from kvmpy.monitor.client import QmpClient  # noqa: E402
from kvmpy.nested import tier2  # noqa: E402
from kvmpy.nested.images import build_guest_initramfs  # noqa: E402
from kvmpy.nested.kernel import unpack  # noqa: E402

HOSTS = TwoHosts("kvmb", "169.254.77")
SRC_NS, DST_NS, SRC_IP, DST_IP = HOSTS.src_ns, HOSTS.dst_ns, HOSTS.src_ip, HOSTS.dst_ip
PORT = 4444
APPEND = "console=ttyS0 panic=-1 quiet"
PARAMS = {"downtime-limit": 300, "max-bandwidth": 1 << 30}     # the same for both VMMs
CONVERGE_S = 120.0              # a migration not switched over by then is cancelled and reported
ROUND_LIMIT_S = 600             # a round still going then fails (SIGALRM), with both consoles
BLOCK = "block"                 # the workload migrating a local disk with the guest (see the docstring)


def dirties(workload: str) -> bool:
    """A workload of MiB rewritten (benchmarks/dirtier.c), not an idle guest."""
    return workload not in ("idle", BLOCK)


def guest_script(workload: str) -> str:
    dirty = "" if not dirties(workload) else (
        f"cp /dirtier /tmp/dirtier && chmod +x /tmp/dirtier && /tmp/dirtier {int(workload)} &\n")
    return dirty + 'i=0; while true; do echo "KVMPY-TICK $i"; i=$((i+1)); sleep 0.5; done\n'


def disk_argv(vmm: str, image: Path) -> list[str]:
    """One writable raw virtio-blk disk (tier2's QEMU disk is snapshot=on: nothing to migrate)."""
    if vmm == "qemu":
        return ["-drive", f"file={image},format=raw,if=none,id=disk0", "-device", "virtio-blk-pci,drive=disk0"]
    return ["--drive", f"file={image}"]


def disk_images(work: Path, vmm: str, template: Path) -> tuple[Path, Path]:
    """The source's image (a copy of `template`) and the destination's (empty, sparse, the same size)."""
    src, dst = work / f"{vmm}-src.img", work / f"{vmm}-dst.img"
    subprocess.run(["cp", "--sparse=never", str(template), str(src)], check=True, timeout=120)
    with open(dst, "wb") as f:
        f.truncate(template.stat().st_size)
    return src, dst


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def vmm_argv(vmm: str, kernel: Path, initrd: Path, append: str, memory: int) -> list[str]:
    if vmm == "qemu":
        return tier2.qemu_guest_argv(kernel, initrd, append, memory_mib=memory, cpus=2)
    # INFO: the source's "migrated: ... downtime (pause, state, last pages, destination's load)"
    # breakdown and the destination's own timings, printed below the round
    return tier2.kvmpy_guest_argv(kernel, initrd, append, memory=f"{memory}M") + ["--smp", "2",
                                                                                  "--log-level", "info"]


def drain(lines: Lines) -> None:
    """Read what a VMM printed so far: its console and log stay visible (and a full pipe never
    blocks its console writes) while the migration is polled."""
    while lines.sel.select(0):
        chunk = os.read(lines.proc.stdout.fileno(), 65536)
        if not chunk:
            return
        lines.buf += chunk


def tail(lines: Lines | None, what: str, count: int = 25) -> str:
    if lines is None:
        return f"--- {what}: not started"
    try:
        drain(lines)
    except (OSError, ValueError):
        pass
    text = lines.buf.decode("utf-8", errors="replace").replace("\r", "")
    status = lines.proc.poll()
    return (f"--- {what} ({'running' if status is None else f'exited {status}'}), last {count} lines:\n"
            + "\n".join(text.splitlines()[-count:]))


TIMINGS = re.compile(rb"^.*(?:migrated: |incoming migration done|incoming: |migration pass |migration's first pass).*$", re.M)


# benchmarks/dirtier.c says it still runs every ~2 s
DIRTIER_ALIVE = re.compile(rb"KVMPY-DIRTIER-ALIVE \d+\r?\n")


def one_round(vmm: str, kernel: Path, initrd: Path, append: str, memory: int, work: Path,
              workload: str = "idle", disk_template: Path | None = None) -> dict:
    sock = work / f"{vmm}-src.qmp"
    base = src_base = dst_base = vmm_argv(vmm, kernel, initrd, append, memory)
    images = disk_mib = None
    if workload == BLOCK:
        images = disk_images(work, vmm, disk_template)
        disk_mib = disk_template.stat().st_size / 2**20
        src_base, dst_base = base + disk_argv(vmm, images[0]), base + disk_argv(vmm, images[1])
    qmp_flag = ["-qmp" if vmm == "qemu" else "--qmp", f"unix:{sock},server=on,wait=off"]
    incoming = ["-incoming" if vmm == "qemu" else "--incoming", f"tcp:{DST_IP}:{PORT}"]
    dst_sock = work / f"{vmm}-dst.qmp"
    src = Lines(in_ns(SRC_NS, src_base + qmp_flag))
    dst = dst_qmp = None
    info: dict = {}
    signal.signal(signal.SIGALRM, round_overdue)
    signal.alarm(ROUND_LIMIT_S)     # a QEMU 4 MiB round once hung until L1's 1500 s limit took the whole run
    try:
        src.wait_for(re.compile(rb"KVMPY-TICK 4\r?\n"), 300)
        if dirties(workload):       # the dirtier runs before the migration starts...
            src.wait_for(DIRTIER_ALIVE, 60)
        dst = Lines(in_ns(DST_NS, dst_base + incoming + [qmp_flag[0], f"unix:{dst_sock},server=on,wait=off"]))
        wait_listening(DST_NS, PORT)
        dst_qmp = QmpClient(str(dst_sock))     # listening before the migration: it hears RESUME
        dst_qmp.connect()
        with QmpClient(str(sock)) as qmp:
            qmp.execute("migrate-set-parameters", PARAMS)
            if workload == BLOCK:
                qmp.execute("migrate-set-capabilities", {"capabilities": [{"capability": "block", "state": True}]})
            qmp.execute("migrate", {"uri": f"tcp:{DST_IP}:{PORT}"})
            deadline = time.monotonic() + CONVERGE_S
            while (info := qmp.execute("query-migrate"))["status"] not in ("completed", "failed",
                                                                            "cancelled"):
                if time.monotonic() > deadline:      # QEMU, too, iterates for ever if it cannot fit
                    qmp.execute("migrate_cancel")
                    print(f"{vmm}: no switchover within {CONVERGE_S:.0f} s: {info}", flush=True)
                    for line in TIMINGS.findall(src.buf)[-12:]:     # where the passes' time went
                        print(f"{vmm} source: {line.decode(errors='replace').strip()}", flush=True)
                    return {"total_ms": None, "downtime_ms": None, "passes": info.get("ram", {}).get(
                            "dirty-sync-count"), "sent": info.get("ram", {}).get("transferred"),
                            "note": f"not converged in {CONVERGE_S:.0f} s"}
                time.sleep(0.05)
                drain(src)
                drain(dst)
            if info["status"] != "completed":
                raise RuntimeError(f"{vmm}'s migration ended {info['status']}: {info.get('error-desc', info)}")
            dst_cpu = process_cpu(dst.proc.pid)
            stopped = event_time(qmp.wait_event("STOP", 10))
        paused_ms = round((event_time(dst_qmp.wait_event("RESUME", 60)) - stopped) * 1000)
        # whole ticks only (benchmarks/migrate_ticks.py): the console arrives cut anywhere
        dst.wait_for(WHOLE_TICK, 120)
        if dirties(workload):       # ...and after it: one that died part way leaves an idle guest
            dst.wait_for(DIRTIER_ALIVE, 60)
        if images is not None and sha256_of(images[1]) != sha256_of(images[0]):
            raise RuntimeError(f"{vmm}: the destination's disk image differs from the source's")
        drain(src)
        problem = continuation_problem(src.buf, dst.buf)
        if problem is not None:
            raise RuntimeError(f"{vmm}: {problem}: the guest did not continue")
    except Exception as exc:    # one failed round is reported with both consoles; the others run
        print(f"{vmm}: FAILED: {exc}\n{tail(src, 'source')}\n{tail(dst, 'destination')}", flush=True)
        ram = info.get("ram", {})
        return {"total_ms": None, "downtime_ms": None, "passes": ram.get("dirty-sync-count"),
                "sent": ram.get("transferred"), "note": f"FAILED: {str(exc)[:100]}"}
    finally:
        signal.alarm(0)
        if dst_qmp is not None:
            dst_qmp.close()
        for lines in (src, dst):
            if lines is not None:
                try:
                    drain(lines)
                except (OSError, ValueError):
                    pass
        src.kill()
        if dst is not None:
            dst.kill()
        for image in images or ():      # L1's /tmp is its RAM
            image.unlink(missing_ok=True)
    ram = info.get("ram", {})
    print(f"{vmm}: {info}", flush=True)
    for where, lines in (("source", src), ("destination", dst)):
        for line in TIMINGS.findall(lines.buf):
            print(f"{vmm} {where}: {line.decode(errors='replace').strip()}", flush=True)
    source_ms = info.get("downtime")     # QEMU's own figure is the source's part
    if vmm == "kvmpy":      # no breakdown in the log (its wording changed?): "-", never the whole downtime
        m = SOURCE_DOWNTIME_LOGGED.search(src.buf)
        source_ms = round(sum(float(x) for x in m.groups())) if m else None
    # the disk copy rate: the disk's bytes over the whole migration. The image's size, not
    # query-migrate's "disk", which QEMU drops once the migration completed (the images' check
    # above says the whole disk arrived)
    disk_rate = None
    if disk_mib is not None and info.get("total-time"):
        disk_rate = round(disk_mib / (info["total-time"] / 1000), 1)
    return {"total_ms": info.get("total-time"), "downtime_ms": info.get("downtime"), "paused_ms": paused_ms,
            "source_ms": source_ms, "sent": ram.get("transferred"), "passes": ram.get("dirty-sync-count"),
            "dst_cpu": dst_cpu, "disk_mib_s": disk_rate,
            "note": "" if disk_rate is None else f"disk {disk_mib:.0f} MiB at {disk_rate} MiB/s"
                                                 + (" (sent: RAM only)" if vmm == "qemu" else "")}


def process_cpu(pid: int) -> str | None:
    """A process's CPU so far, "user+sys s" (/proc/PID/stat), or None once it is gone. The
    destination's, read when the source says completed: its start-up and everything it received,
    where a slow total goes when the destination is the bottleneck (sys: page faults, recv)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    return f"{int(fields[11]) / tick:.1f}+{int(fields[12]) / tick:.1f} s"


def round_overdue(signum: int, frame: object) -> None:
    raise TimeoutError(f"the round took more than {ROUND_LIMIT_S} s")


def event_time(event: dict) -> float:
    """A QMP event's timestamp (wall clock, as both VMMs stamp it) in seconds."""
    stamp = event["timestamp"]
    return stamp["seconds"] + stamp["microseconds"] / 1e6


KEYS = ("total_ms", "downtime_ms", "source_ms", "paused_ms")


def medians(results: list[dict]) -> dict | None:
    """The median of each timing over the rounds that completed, with their count; None if none did."""
    done = [r for r in results if all(r.get(key) is not None for key in KEYS)]
    if not done:
        return None
    return {"rounds": len(done), **{key: statistics.median(r[key] for r in done) for key in KEYS}}


def fmt(value, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", default="idle,4,32,block", help="idle, block and/or MiB rewritten")
    ap.add_argument("--memory", type=int, default=512, help="guest MiB")
    ap.add_argument("--disk-mib", type=int, default=256, help="the block workload's disk")
    args = ap.parse_args()
    kernel = unpack()
    dirtier = Path(tempfile.mkdtemp(prefix="kvmpy-migbench-")) / "dirtier"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(dirtier),
                    str(Path(__file__).with_name("dirtier.c"))], check=True, timeout=120)
    initrd = build_guest_initramfs(kernel, files={"dirtier": dirtier.read_bytes()})
    HOSTS.create()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="kvmpy-migbench-") as tmp:
            template = None
            if BLOCK in args.workloads.split(","):      # random: no block of it goes as zero
                template = Path(tmp) / "disk-template.img"
                with open(template, "wb") as f:
                    for _ in range(args.disk_mib):
                        f.write(os.urandom(1 << 20))
            for workload in args.workloads.split(","):
                append = f"{APPEND} {tier2.test_script_arg(guest_script(workload))}"
                for vmm in ("kvmpy", "qemu"):
                    r = one_round(vmm, kernel.bzimage, initrd, append, args.memory, Path(tmp), workload, template)
                    rows.append((workload, vmm, r))
                    print(f"{workload:>6} {vmm:6} {r}", flush=True)
    finally:
        HOSTS.remove()
    print(f"\nlive migration over tcp between two namespaces (veth), {args.memory} MiB, 2 vCPUs, "
          f"downtime-limit {PARAMS['downtime-limit']} ms, max-bandwidth 1 GiB/s")
    print(f"{'workload':>9} {'vmm':6} {'total':>9} {'downtime':>9} {'source':>9} {'paused':>9} {'sent':>9} {'passes':>6} {'dst CPU u+s':>12}")
    for workload, vmm, r in rows:
        sent = None if r["sent"] is None else f"{r['sent'] / 2**20:.1f}"
        print(f"{workload + (' MiB' if dirties(workload) else ''):>9} {vmm:6} "
              f"{fmt(r['total_ms'], ' ms'):>9} {fmt(r['downtime_ms'], ' ms'):>9} "
              f"{fmt(r.get('source_ms'), ' ms'):>9} {fmt(r.get('paused_ms'), ' ms'):>9} {fmt(sent, ' MiB'):>9} {fmt(r['passes']):>6} {fmt(r.get('dst_cpu')):>12} {r.get('note', '')}")
    print("\ngoals: downtime <= QEMU's; total time <= 1.2x QEMU's. \"downtime\": each VMM's own "
          "figure (QEMU's ends when its source has sent everything, kvmpy's when its destination "
          "has loaded the guest); \"source\": pause to the stream's last byte (QEMU's own figure); "
          "\"paused\": source STOP to destination RESUME, both alike")
    print("(a workload given more than once, e.g. --workloads idle,4,idle,4,idle,4: medians of its "
          "completed rounds; L1 swings single rounds by 2x)")
    for workload in dict.fromkeys(w for w, _, _ in rows):
        k, q = (medians([r for w, v, r in rows if w == workload and v == vmm]) for vmm in ("kvmpy", "qemu"))
        if k is None or q is None:
            continue
        verdicts = []
        for key, name in (("downtime_ms", "downtime"), ("source_ms", "source"), ("paused_ms", "paused")):
            verdicts.append(f"{name} {k[key]:.0f} vs {q[key]:.0f} ms ({'met' if k[key] <= q[key] else 'NOT met'})")
        total = k["total_ms"] / max(q["total_ms"], 1)
        print(f"{workload:>9}: {k['rounds']}/{q['rounds']} rounds, total {total:.2f}x QEMU "
              f"({'met' if total <= 1.2 else 'NOT met'}), " + ", ".join(verdicts))
        rates = [[r["disk_mib_s"] for w, v, r in rows if w == workload and v == vmm and r.get("disk_mib_s")]
                 for vmm in ("kvmpy", "qemu")]
        if all(rates):
            print(f"{'':>9}  disk copy rate {statistics.median(rates[0])} vs {statistics.median(rates[1])} MiB/s "
                  f"(median; the disk's bytes over the total time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
