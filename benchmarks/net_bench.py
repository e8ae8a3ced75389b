"""virtio-net throughput and latency, kvmpy vs QEMU, each with vhost-net on and off.

The guest (stock Debian kernel, busybox initramfs with the host's iperf3 and its libraries baked
in) sits on one TAP in L1 that holds a link-local host address; L1 runs `iperf3 -s` on it. The
guest pings the host (RTT), then runs iperf3 as the client twice: guest->host (it sends) and
host->guest (-R: the host sends). Every VMM gets the same kernel, initrd, command line, TAP, MAC,
one vCPU and 512 MiB; QEMU gets `-netdev tap,vhost=on|off` + `virtio-net-pci`, kvmpy
`--nic tap,ifname=...,vhost=on|off` on the same existing TAP. Rounds are interleaved, the order
flipping each round, so load changes and position hit all alike; the table shows medians and
kvmpy as a multiple of QEMU in the same mode.
Goals (issue 12): with vhost >= 0.95x QEMU with vhost; in userspace >= 0.5x QEMU's userspace
(for ping the multiple is QEMU's RTT over kvmpy's, so higher is better there too).

TCP's hybrid slow start (CUBIC's HyStart) is off by default, in the guest (the guest->host
sender) and in L1 (the host->guest sender, put back afterwards; a real host's TCP is left alone);
`--hystart on` keeps it. Why: a short run is mostly the window's growth, and in L1 HyStart ends slow
start at random points. With it on, kvmpy's guest left slow start by ACK-train detection at a
window of 64 segments in 3 of 4 runs (the window then crept up from ~300 KB: 130-150 Mbit/s
guest->host), QEMU's by delay detection at ~1000-1185 segments (1-1.6 MB: 140-180 Mbit/s);
probably kvmpy's lower round-trip time (the ping column) shortens the ACK-train threshold, half
the minimum RTT seen (not measured). With it off no run lost a segment (iperf3's Retr 0), every
run reached its receive window, and both VMMs' rates rose (one 3-round run: kvmpy-vhost 203-234,
QEMU 245-285 Mbit/s guest->host): what is left between them is the data path, not where a
heuristic fired. Each round prints where the guest's sender left slow start.

Only 169.254.88.0/24 on the TAP this script creates (and removes): no traffic leaves L1.

    python benchmarks/net_bench.py --prepare      # host: kernel, initrd with iperf3; prints it
    python -m kvmpy.nested run -- python benchmarks/net_bench.py --rounds 2
    make bench-net                                # both steps
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmpy.errors import NestedError  # noqa: E402
from kvmpy.nested import tier2  # noqa: E402
from kvmpy.nested.images import build_guest_initramfs  # noqa: E402
from kvmpy.nested.kernel import KernelPackage, cache_root, unpack  # noqa: E402
from kvmpy.nested.netscripts import IPERF3_PREPARE, iperf3_guest_files  # noqa: E402

TAP = "kvbench0"
HOST_IP, GUEST_IP, PREFIX = "169.254.88.1", "169.254.88.2", 24
GUEST_MAC = "52:54:00:4b:42:01"
IPERF_PORT = 5201
PINGS = 20
APPEND = "console=ttyS0 panic=-1 quiet"
VMMS = ("kvmpy-vhost", "qemu-vhost", "kvmpy-user", "qemu-user")
# kvmpy-user-py: userspace on the pure-Python data path (KVMPY_VIRTIO_C=0), to see what C buys
EXTRA_VMMS = ("kvmpy-user-py",)
GUEST_SCRIPT = IPERF3_PREPARE + """\
p() {{ sed "s/^/NETBENCH-$1 /"; }}
ip link set lo up
n=0; while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
ip addr add {guest}/{prefix} dev eth0; ip link set eth0 up
n=0; until ping -c 1 -W 1 {host} >/dev/null 2>&1 || [ $n -ge 30 ]; do n=$((n+1)); done
ping -c {pings} -i 0.2 {host} | p PING
{hystart_off}grep '^cpu ' /proc/stat | p STAT0
iperf3 -c {host} -p {port} -t {secs} -f m | grep receiver | p TX
iperf3 -c {host} -p {port} -t {secs} -f m -R | grep receiver | p RX
grep '^cpu ' /proc/stat | p STAT1
grep TcpExt: /proc/net/netstat | p TCPEXT
"""
HYSTART = "/sys/module/tcp_cubic/parameters/hystart_detect"
GUEST_HYSTART_OFF = f"echo 0 > {HYSTART}\n"
PING_RE = re.compile(r"NETBENCH-PING round-trip min/avg/max = ([\d.]+)/([\d.]+)/([\d.]+) ms")
# each reply's line too: the median is the robust figure (a few 10-20 ms replies, L1 scheduling
# hiccups, move the average of 20 by a millisecond)
REPLY_RE = re.compile(r"NETBENCH-PING \d+ bytes from .*time=([\d.]+) ms")
IPERF_RE = re.compile(r"NETBENCH-(TX|RX) .*?([\d.]+) Mbits/sec.*receiver")
# the guest's /proc/stat "cpu" line before and after both iperf3 runs: user nice system idle
# iowait irq softirq steal. Steal is time the vCPU thread was runnable in L1 but not running:
# where a VMM's own threads (or anything else in L1) take the CPU from its guest, it shows here.
STAT_RE = re.compile(r"NETBENCH-STAT([01]) cpu\s+([\d ]+)")
# the guest's TcpExt counters after both runs (a names line, then a values line): where its
# CUBIC left slow start in the guest->host run (HyStart's ACK-train or delay detection, and at
# which congestion window, in segments), which decides a short run's rate (see --hystart)
TCPEXT_RE = re.compile(r"NETBENCH-TCPEXT TcpExt: (.*)")


@dataclass
class Sample:
    tx_mbps: float      # guest -> host
    rx_mbps: float      # host -> guest
    rtt_ms: float       # guest -> host ping, average
    steal_pct: float | None = None  # of the vCPU's time during the iperf3 runs (None: not reported)
    idle_pct: float | None = None
    rtt_median_ms: float | None = None    # of the replies' times
    slow_start: str = ""                  # how the guest's sender left slow start (slow_start_exit)


def slow_start_exit(output: str) -> str:
    """"ACK train at cwnd 64", "delay at cwnd 1185", "not by HyStart", or "" when not reported."""
    rows = [m.group(1).split() for m in TCPEXT_RE.finditer(output)]
    if len(rows) < 2 or len(rows[0]) != len(rows[1]) or not all(v.isdigit() for v in rows[1]):
        return ""
    c = dict(zip(rows[0], map(int, rows[1])))
    for kind, name in (("ACK train", "TCPHystartTrain"), ("delay", "TCPHystartDelay")):
        if c.get(f"{name}Detect"):
            return f"{kind} at cwnd {c.get(f'{name}Cwnd', 0)}"
    return "not by HyStart"


def cpu_shares(output: str) -> tuple[float | None, float | None]:
    """(steal %, idle %) of the guest's CPU time between the two NETBENCH-STAT lines."""
    lines = {m.group(1): [int(v) for v in m.group(2).split()] for m in STAT_RE.finditer(output)}
    if set(lines) != {"0", "1"} or len(lines["0"]) < 8 or len(lines["1"]) < 8:
        return None, None
    delta = [b - a for a, b in zip(lines["0"], lines["1"])]
    total = sum(delta[:8])
    if total <= 0:
        return None, None
    return 100.0 * delta[7] / total, 100.0 * (delta[3] + delta[4]) / total


def parse_results(output: str) -> Sample | None:
    """All three figures, or None when any is missing."""
    ping = PING_RE.search(output)
    rates = {m.group(1): float(m.group(2)) for m in IPERF_RE.finditer(output)}
    if ping is None or set(rates) != {"TX", "RX"}:
        return None
    steal, idle = cpu_shares(output)
    replies = [float(t) for t in REPLY_RE.findall(output)]
    return Sample(rates["TX"], rates["RX"], float(ping.group(2)), steal, idle,
                  statistics.median(replies) if replies else None, slow_start_exit(output))


class ThreadCpu:
    """Where the VMM's CPU goes while packets flow: once a second, the TAP's byte counters and
    the utime+stime of each of the VMM's threads (and of its vhost worker, a kernel thread named
    vhost-<pid>); a second in which the TAP moved more than 1 MB counts. Why: the guest is
    CPU-bound in both VMMs and its steal differs (kvmpy-vhost ~3 points more), so the question
    is which threads of which VMM take L1's CPU during the iperf3 runs. Once a second and by
    pid, so that the sampler itself (Python in L1) takes next to nothing."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, tap: str):
        self.tap = tap
        self.busy: dict[str, float] = {}    # thread name -> CPU seconds while packets flowed
        self.traffic_s = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="net-bench-sampler", daemon=True)

    def __enter__(self) -> "ThreadCpu":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def report(self, top: int = 6) -> str:
        if self.traffic_s <= 0:
            return "no traffic seen"
        shares = sorted(self.busy.items(), key=lambda kv: -kv[1])
        total = sum(self.busy.values())
        return (f"threads' CPU while packets flowed ({self.traffic_s:.0f} s): all {100 * total / self.traffic_s:.0f}%, "
                + ", ".join(f"{name} {100 * cpu / self.traffic_s:.0f}%" for name, cpu in shares[:top]))

    def _tap_bytes(self) -> int:
        base = f"/sys/class/net/{self.tap}/statistics/"
        try:
            return sum(int(Path(base + f).read_text()) for f in ("rx_bytes", "tx_bytes"))
        except (OSError, ValueError):
            return 0

    @staticmethod
    def _stat(path: str) -> tuple[str, int] | None:
        """(comm, utime + stime ticks) of one /proc/.../stat, None if gone."""
        try:
            text = Path(path).read_text()
        except OSError:
            return None
        head, _, rest = text.rpartition(")")
        fields = rest.split()
        return head.partition("(")[2], int(fields[11]) + int(fields[12])

    def _vmm_pid(self) -> int | None:
        """Our child that is a VMM (run_guest's; iperf3 -s is our child too), if it runs."""
        me = str(os.getpid())
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    fields = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
                    if fields and fields[1] == me:
                        argv = Path(f"/proc/{entry}/cmdline").read_bytes()
                        if b"kvmpy" in argv or b"qemu-system" in argv:
                            return int(entry)
                except OSError:
                    continue
        return None

    def _vhost_workers(self, pid: int) -> list[str]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if Path(f"/proc/{entry}/comm").read_text().strip() == f"vhost-{pid}":
                        found.append(f"/proc/{entry}/stat")
                except OSError:
                    continue
        return found

    def _sample(self, pid: int, workers: list[str]) -> dict[str, int]:
        ticks: dict[str, int] = {}
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return ticks
        for path in [f"/proc/{pid}/task/{tid}/stat" for tid in tids] + workers:
            got = self._stat(path)
            if got is not None:
                name = f"{got[0]}[{path.split('/')[-2]}]"
                ticks[name] = got[1]
        return ticks

    def _run(self) -> None:
        pid = None
        while pid is None and not self._stop.wait(1.0):
            pid = self._vmm_pid()
        if pid is None:
            return
        # the vhost worker is looked for once: a userspace NIC has none, and a walk of /proc
        # every second while packets flow would take the CPU this measures
        workers: list[str] = []
        looked = False
        last_bytes, last = self._tap_bytes(), self._sample(pid, workers)
        last_at = time.monotonic()
        while not self._stop.wait(1.0):
            moved, now = self._tap_bytes(), self._sample(pid, workers)
            at = time.monotonic()
            if not now:     # it ended (or run_guest started it again after an L1 livelock)
                found = self._vmm_pid()
                if found is not None and found != pid:
                    pid, workers, looked = found, [], False
                    last_bytes, last, last_at = moved, self._sample(pid, workers), at
                continue
            if moved - last_bytes > 1_000_000:
                if not looked:      # vhost's worker exists once the device is up
                    workers, looked = self._vhost_workers(pid), True
                self.traffic_s += at - last_at
                for name, ticks in now.items():
                    if name in last:
                        self.busy[name] = self.busy.get(name, 0.0) + (ticks - last[name]) / self.TICK
            last_bytes, last, last_at = moved, now, at


def argv_for(vmm: str, kernel: Path, initrd: Path, append: str, kvmpy_args: Sequence[str] = ()) -> list[str]:
    """`vmm` is kvmpy-vhost|kvmpy-user[-py]|qemu-vhost|qemu-user, all on the existing TAP;
    `kvmpy_args`: more `kvmpy boot` flags (e.g. --stats: exits per address, printed at the end)."""
    vhost = "on" if vmm.endswith("vhost") else "off"
    if vmm.startswith("kvmpy"):
        return [sys.executable, "-m", "kvmpy", "--log-level", "info", "boot", "--kernel", str(kernel),
                "--initrd", str(initrd), "--append", append, "--serial", "stdio", "--no-reboot",
                "-m", "512M", "--nic", f"tap,ifname={TAP},mac={GUEST_MAC},vhost={vhost}", *kvmpy_args]
    return tier2.qemu_guest_argv(kernel, initrd, append, machine="pc", extra=[
        "-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost={vhost}",
        "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC}"])


def _ip(*args: str, check: bool = True) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NestedError(f"ip {' '.join(args)}", detail=r.stderr.strip())


def make_tap() -> None:
    """A persistent vnet_hdr TAP holding the host's address, up (left over ones are replaced)."""
    if os.path.exists(f"/sys/class/net/{TAP}"):
        _ip("link", "del", TAP)
    _ip("tuntap", "add", "dev", TAP, "mode", "tap", "vnet_hdr")
    _ip("addr", "add", f"{HOST_IP}/{PREFIX}", "dev", TAP)
    _ip("link", "set", TAP, "up")


def start_iperf_server() -> subprocess.Popen:
    try:
        proc = subprocess.Popen(["iperf3", "-s", "-B", HOST_IP, "-p", str(IPERF_PORT)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    except OSError as e:
        raise NestedError("starting iperf3 -s", errno=e.errno, detail="install the iperf3 package") from None
    time.sleep(0.5)
    if proc.poll() is not None:
        raise NestedError("starting iperf3 -s", detail=f"exited {proc.returncode} at once")
    return proc


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@contextlib.contextmanager
def host_hystart(enabled: bool, inside_l1: bool):
    """This host's CUBIC HyStart (the host->guest runs' sender) as --hystart asks, for the
    bench's length, put back after; only in L1, whose TCP is the bench's own: a real host's is
    left alone. Yields how it ran, for the table."""
    if enabled:
        yield "on"
        return
    if not inside_l1:
        yield "on (this host's TCP is left alone)"
        return
    path = Path(HYSTART)
    try:
        before = path.read_text().strip()
        path.write_text("0")
    except OSError as e:
        yield f"on (could not switch it off: {e.strerror})"
        return
    try:
        yield "off"
    finally:
        path.write_text(before)


def ratio(a: float, b: float) -> str:
    return f"{a / b:5.2f}x" if b else "  n/a"


def print_table(results: dict[str, list[Sample]], rounds: int, kernel: KernelPackage, secs: float,
                hystart: str) -> None:
    def median_of(samples: list[Sample], key: str) -> float | None:
        values = [getattr(s, key) for s in samples if getattr(s, key) is not None]
        return statistics.median(values) if values else None
    med = {v: Sample(median_of(results[v], "tx_mbps"), median_of(results[v], "rx_mbps"),
                     median_of(results[v], "rtt_ms"), rtt_median_ms=median_of(results[v], "rtt_median_ms"))
           for v in results if results[v]}
    print(f"\nvirtio-net over a TAP in L1, median of {rounds} round(s), iperf3 TCP {secs:g}s each way, "
          f"ping x{PINGS} guest->host, kernel {kernel.release}, 1 vCPU, 512 MiB\n"
          f"TCP CUBIC's HyStart: {hystart}")
    print(f"{'vmm':14s} {'guest->host Mbit/s':>19s} {'host->guest Mbit/s':>19s} {'ping avg ms':>12s} {'ping median ms':>15s}")
    for vmm, m in med.items():
        print(f"{vmm:14s} {m.tx_mbps:19.1f} {m.rx_mbps:19.1f} {m.rtt_ms:12.3f} {fmt_ms(m.rtt_median_ms):>15s}")
    print(f"\n{'kvmpy / QEMU':14s} {'guest->host':>12s} {'host->guest':>12s} {'ping (1/RTT)':>13s} {'(medians)':>10s}  goal")
    for mode, goal in (("vhost", 0.95), ("user", 0.5), ("user-py", 0.5)):
        k, q = med.get(f"kvmpy-{mode}"), med.get(f"qemu-{mode.split('-')[0]}")
        if k is None or q is None:
            continue
        figures = (k.tx_mbps / q.tx_mbps if q.tx_mbps else 0, k.rx_mbps / q.rx_mbps if q.rx_mbps else 0,
                   q.rtt_ms / k.rtt_ms if k.rtt_ms else 0)
        missed = [name for name, f in zip(("guest->host", "host->guest", "ping"), figures) if f < goal]
        medians = ratio(q.rtt_median_ms, k.rtt_median_ms) if q.rtt_median_ms and k.rtt_median_ms else "n/a"
        print(f"{mode:14s} {ratio(k.tx_mbps, q.tx_mbps):>12s} {ratio(k.rx_mbps, q.rx_mbps):>12s} "
              f"{ratio(q.rtt_ms, k.rtt_ms):>13s} {medians:>10s}  >= {goal:.2f}x: "
              + ("met" if not missed else "MISSED (" + ", ".join(missed) + ")"))
    print("(the goal is judged on the average RTT, as busybox ping reports it; the replies' median is "
          "printed beside it, since a few slow replies move an average of 20)")


def fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", action="store_true", help="build the kernel and the initrd; print the initrd")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0, help="iperf3 -t, each direction (its own default)")
    ap.add_argument("--vmms", default=",".join(VMMS))
    ap.add_argument("--hystart", choices=("on", "off"), default="off",
                    help="CUBIC's hybrid slow start in the guest and in L1 (off by default: see the docstring)")
    ap.add_argument("--kvmpy-args", default="", help="more kvmpy boot flags, e.g. --stats (its exit "
                                                     "counts land in the round's log)")
    args = ap.parse_args()
    vmms = args.vmms.split(",")
    if not set(vmms) <= set(VMMS + EXTRA_VMMS) or args.rounds < 1 or not 1 <= args.seconds <= 60:
        ap.error(f"--vmms from {','.join(VMMS + EXTRA_VMMS)}, --rounds >= 1, --seconds 1..60")
    kernel = unpack()
    initrd = build_guest_initramfs(kernel, files=iperf3_guest_files())
    if args.prepare:
        print(initrd)
        return 0
    if (blocked := tier2.tests_can_run_here()) is not None:
        print(f"net_bench: {blocked.reason}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("net_bench: needs root (it makes a TAP and gives it an address)", file=sys.stderr)
        return 2
    script = GUEST_SCRIPT.format(guest=GUEST_IP, prefix=PREFIX, host=HOST_IP, port=IPERF_PORT,
                                 secs=f"{args.seconds:g}", pings=PINGS,
                                 hystart_off="" if args.hystart == "on" else GUEST_HYSTART_OFF)
    append = f"{APPEND} {tier2.test_script_arg(script)}"
    log_dir = cache_root() / "logs"
    results: dict[str, list[Sample]] = {v: [] for v in vmms}
    timeout_s = 120 + 3 * args.seconds
    make_tap()
    failed = False
    hystart = contextlib.ExitStack()
    try:
        host_side = hystart.enter_context(host_hystart(args.hystart == "on", tier2.tier2_mode().kind == "inside"))
        hystart_note = f"{args.hystart} in the guest, {host_side} in the host"
        for rnd in range(args.rounds):
            # the order flips every round: a VMM always run first (right after the previous
            # one's teardown, or the iperf3 server's start) would carry any position effect alone
            for vmm in (vmms if rnd % 2 == 0 else vmms[::-1]):
                server = start_iperf_server()
                os.environ["KVMPY_VIRTIO_C"] = "0" if vmm.endswith("-py") else "1"
                try:
                    with ThreadCpu(TAP) as threads:
                        run = tier2.run_guest(argv_for(vmm, kernel.bzimage, initrd, append, shlex.split(args.kvmpy_args)),
                                              timeout_s=timeout_s,
                                              log_path=log_dir / f"netbench-{vmm}-r{rnd + 1}.log")
                finally:
                    os.environ.pop("KVMPY_VIRTIO_C", None)
                    stop(server)
                sample = parse_results(run.output) if run.test_rc == 0 else None
                if sample is None:   # one failed VMM does not cost the others' figures
                    failed = True
                    print(f"round {rnd + 1} {vmm}: FAILED (status {run.exit_status}, test rc {run.test_rc})")
                    print(run.tail(30), file=sys.stderr)
                    continue
                shares = ("" if sample.steal_pct is None else
                          f"  guest CPU: steal {sample.steal_pct:4.1f}% idle {sample.idle_pct:4.1f}%")
                if sample.slow_start:
                    shares += f"  g->h left slow start: {sample.slow_start}"
                print(f"round {rnd + 1} {vmm:13s} g->h {sample.tx_mbps:8.1f} Mbit/s  h->g {sample.rx_mbps:8.1f} "
                      f"Mbit/s  ping {sample.rtt_ms:7.3f} ms (median {fmt_ms(sample.rtt_median_ms)})  ({run.elapsed_s:.1f}s){shares}", flush=True)
                print(f"round {rnd + 1} {vmm:13s} {threads.report()}", flush=True)
                results[vmm].append(sample)
    finally:
        hystart.close()
        _ip("link", "del", TAP, check=False)
    print_table(results, args.rounds, kernel, args.seconds, hystart_note)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except NestedError as e:
        print(f"net_bench: {e}", file=sys.stderr)
        sys.exit(1)
