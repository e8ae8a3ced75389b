"""bench-net's reading of the guest's console (benchmarks/net_bench.py parse_results): the three
figures, the steal share, and the replies' median RTT beside busybox's average."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from net_bench import parse_results  # noqa: E402

REPLIES = [2.3, 2.5, 2.4, 19.9, 2.6]       # one slow reply moves the average, not the median


def console(replies=REPLIES, summary=True, iperf=("TX", "RX")) -> str:
    lines = ["NETBENCH-PING PING 169.254.88.1 (169.254.88.1): 56 data bytes"]
    lines += [f"NETBENCH-PING 64 bytes from 169.254.88.1: seq={i} ttl=64 time={t:.3f} ms"
              for i, t in enumerate(replies)]
    lines += ["NETBENCH-PING ", "NETBENCH-PING --- 169.254.88.1 ping statistics ---",
              f"NETBENCH-PING {len(replies)} packets transmitted, {len(replies)} packets received, 0% packet loss"]
    if summary:
        avg = sum(replies) / len(replies)
        lines.append(f"NETBENCH-PING round-trip min/avg/max = {min(replies):.3f}/{avg:.3f}/{max(replies):.3f} ms")
    lines.append("NETBENCH-STAT0 cpu  100 0 50 800 0 0 10 40")
    for kind, rate in (("TX", 241.0), ("RX", 378.0)):
        if kind in iperf:
            lines.append(f"NETBENCH-{kind} [  5]   0.00-5.00   sec   144 MBytes   {rate} Mbits/sec   receiver")
    lines.append("NETBENCH-STAT1 cpu  300 0 150 900 0 0 30 120")
    return "\r\n".join(lines) + "\r\n"


def test_all_figures_and_the_median_next_to_the_average():
    s = parse_results(console())
    assert s is not None
    assert (s.tx_mbps, s.rx_mbps) == (241.0, 378.0)
    assert abs(s.rtt_ms - sum(REPLIES) / len(REPLIES)) < 1e-3
    assert s.rtt_median_ms == 2.5
    assert s.steal_pct is not None and abs(s.steal_pct - 100 * 80 / 500) < 1e-9


def test_a_missing_figure_is_no_sample():
    assert parse_results(console(summary=False)) is None
    assert parse_results(console(iperf=("TX",))) is None


def test_no_reply_lines_leave_the_median_unknown():
    text = "\r\n".join(line for line in console().splitlines() if "bytes from" not in line)
    s = parse_results(text)
    assert s is not None and s.rtt_median_ms is None


TCPEXT_NAMES = "SyncookiesSent DelayedACKs TCPHystartTrainDetect TCPHystartTrainCwnd TCPHystartDelayDetect TCPHystartDelayCwnd TCPOrigDataSent"


def with_tcpext(values: str | None, names: str = TCPEXT_NAMES) -> str:
    out = console()
    if values is not None:
        out += f"NETBENCH-TCPEXT TcpExt: {names}\r\nNETBENCH-TCPEXT TcpExt: {values}\r\n"
    return out


def test_where_the_guest_left_slow_start():
    """The guest's own TcpExt counters, as its kernel prints them: an ACK-train exit at 64
    segments (what held kvmpy's 5 s runs at ~300 KB of window), a delay exit, neither."""
    assert parse_results(with_tcpext("0 1 1 64 0 0 48013")).slow_start == "ACK train at cwnd 64"
    assert parse_results(with_tcpext("0 1 0 0 1 1185 60008")).slow_start == "delay at cwnd 1185"
    assert parse_results(with_tcpext("0 1 0 0 0 0 110419")).slow_start == "not by HyStart"


def test_missing_or_garbled_counters_say_nothing_and_cost_no_figure():
    for values in (None, "0 1 1", "0 1 x 64 0 0 1"):
        s = parse_results(with_tcpext(values))
        assert s is not None and s.tx_mbps == 241.0
        assert s.slow_start == ""
