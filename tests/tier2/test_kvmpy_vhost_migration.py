"""Tier 2: live migration of a stock Linux guest whose NIC runs on vhost-net (issues 11 and 12:
"vhost's dirty log feeds live migration"), while L1 streams data to it over the TAP, so the
kernel's vhost worker keeps writing received frames into guest RAM during the passes: writes
neither KVM's dirty log nor kvmpy's own map sees, only vhost's log (kvmpy.vhost.dirtylog).

Source and destination are two kvmpy processes in L1, each with its own TAP (kvmpy makes them)
on one L1 bridge that holds the host's link-local address, as QEMU users migrate between two TAPs
on a bridge. The source (an API process, as in test_kvmpy_live_migration) migrates once the
guest has received its first 4 MiB; L1 keeps sending until the source has given the guest up and
a few seconds more, then closes. The guest, now on the destination, prints the size and sha256
of everything it received: it must equal what L1 sent. A page vhost wrote after the pass that
copied it, and not sent again, would corrupt the stream (or the guest's TCP state). Only
169.254.0.0/16 on interfaces this test creates.

vhost is no part of the migration's identity (as in QEMU): either side may run the NIC in the
kernel or in userspace. A vhost=on destination once stopped receiving at the switchover (rx_packets
and the input.0 interrupts froze): its rings went to vhost-net during the board's restore, and the
first rx interrupt vhost signalled was wiped by the LAPIC restore that followed; they now go to the
kernel when the machine runs (VirtioNet.resume), as QEMU starts vhost.
"""
from __future__ import annotations

import hashlib
import random
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from kvmpy.nested.netscripts import SCRIPT_DONE, TCP_TO_GUEST_PORT
from test_kvmpy_live_migration import _free_port
from test_kvmpy_net import ip, link_exists, root_in_l1  # noqa: F401 (root_in_l1: a fixture)

TIMEOUT_S = 300.0
DEST_TIMEOUT_S = 200.0          # the destination's whole life: boot of the source, migration, the rest
BRIDGE, SOURCE_TAP, DEST_TAP = "kvmigbr0", "kvmigtap0", "kvmigtap1"
HOST_IP, GUEST_IP = "169.254.81.1", "169.254.81.2"
GUEST_MAC = "52:54:00:4b:56:09"
APPEND = "console=ttyS0 panic=-1 quiet"
STREAMING_AT = 4 << 20          # the source migrates once the guest holds this much
CHUNK = 64 << 10
PACE_S = 0.025                  # a chunk per PACE_S: ~2.5 MiB/s, written into guest RAM by vhost
AFTER_S = 3.0                   # L1 keeps sending this long after the source gave the guest up
MAX_BYTES = 192 << 20           # the guest keeps it all in its rootfs (512 MiB of RAM)

GUEST_SCRIPT = f"""\
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
ip addr add {GUEST_IP}/16 dev eth0 && ip link set eth0 up
n=0
until timeout 5 ping -c 1 -W 2 {HOST_IP} > /dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n+1)); done
: > /tmp/rx.bin
timeout 600 nc {HOST_IP} {TCP_TO_GUEST_PORT} < /dev/null > /tmp/rx.bin &
receiver=$!
n=0
while [ "$(wc -c < /tmp/rx.bin)" -lt {STREAMING_AT} ] && [ $n -lt 1200 ]; do sleep 0.1; n=$((n+1)); done
echo "KVMPY-STREAMING $(wc -c < /tmp/rx.bin)"
# progress every 2 s: whether frames still arrive (and interrupts) if the stream stalls
( while true; do echo "KVMPY-PROGRESS $(wc -c < /tmp/rx.bin) rx_packets=$(cat /sys/class/net/eth0/statistics/rx_packets) \
$(grep -E 'input|output' /proc/interrupts | sed 's/^ *[0-9]*: *\\([0-9]*\\) *\\([0-9]*\\) .* \\([^ ]*\\)$/\\3=\\1+\\2/' | tr '\\n' ' ')"
sleep 2; done ) &
progress=$!
wait $receiver
kill $progress
echo "KVMPY-RX $(wc -c < /tmp/rx.bin) $(sha256sum /tmp/rx.bin | cut -d' ' -f1)"
echo {SCRIPT_DONE}
"""

SOURCE = """\
import errno, logging, sys, time
from kvmpy import Machine
from kvmpy.devices.virtio.netspec import parse_nic_spec
from kvmpy.errors import MigrationError
from kvmpy.migrate.live import migrate_out
logging.basicConfig(level=logging.INFO, format="kvmpy-source: %(levelname)s %(name)s: %(message)s")
kernel, initrd, append, nic, uri, console_out = sys.argv[1:7]
with Machine(kernel=kernel, initrd=initrd, append=append, memory="512M", smp=2, nics=[parse_nic_spec(nic)],
             timeout=250) as m:
    m.migration_parameters["downtime-limit"] = 3000     # nested TCG: see test_kvmpy_live_migration
    m.start()
    m.console.expect(r"KVMPY-STREAMING [0-9]+", timeout=240)
    deadline = time.monotonic() + 60
    while True:
        try:
            stats = migrate_out(m, uri)
            break
        except MigrationError as e:
            if e.errno != errno.ECONNREFUSED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    open(console_out, "w").write(m.console.text)
    ram = stats["ram"]
    print("KVMPY-MIGRATED", m.status, "total", stats["total-time"], "ms downtime", stats["downtime"],
          "ms passes", ram["dirty-sync-count"], "bytes", ram["transferred"], flush=True)
"""


def listen() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((HOST_IP, TCP_TO_GUEST_PORT))
    s.listen(1)
    s.settimeout(TIMEOUT_S)
    return s


def stream_to_guest(srv: socket.socket, results: dict, migrated: threading.Event) -> None:
    """L1's half: accept the guest's connection on the bridge's address and send seeded random
    chunks, paced, until AFTER_S after `migrated` (or MAX_BYTES); record size and sha256."""
    rng, digest, sent = random.Random(11), hashlib.sha256(), 0
    try:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(60)
                stop_at = None
                while sent < MAX_BYTES and (stop_at is None or time.monotonic() < stop_at):
                    if stop_at is None and migrated.is_set():
                        stop_at = time.monotonic() + AFTER_S
                        results["at-switchover"] = sent
                    chunk = rng.randbytes(CHUNK)
                    conn.sendall(chunk)
                    digest.update(chunk)
                    sent += len(chunk)
                    time.sleep(PACE_S)
    except Exception as e:   # recorded for the assertion message; the guests run on
        results["error"] = repr(e)
    results["sent"] = (sent, digest.hexdigest())


def _remove_links() -> None:
    for name in (SOURCE_TAP, DEST_TAP, BRIDGE):
        if link_exists(name):
            subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=30)


def diagnosis() -> str:
    """What L1's side of the network looks like (for a failure's message)."""
    out = []
    for argv in (["ip", "-s", "link", "show", DEST_TAP], ["bridge", "fdb", "show", "br", BRIDGE]):
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        out.append(f"$ {' '.join(argv)}\n{r.stdout}{r.stderr}")
    return "\n".join(out)


@pytest.mark.parametrize("source_vhost,dest_vhost", [("on", "off"), ("on", "on"), ("off", "on")])
def test_streaming_guest_migrated_live_with_vhost_net(root_in_l1, stock_bzimage, build_initramfs, run_guest,  # noqa: F811
                                                      tmp_path, source_vhost, dest_vhost):
    _remove_links()
    ip("link", "add", BRIDGE, "type", "bridge")
    try:
        ip("addr", "add", f"{HOST_IP}/16", "dev", BRIDGE)
        ip("link", "set", BRIDGE, "up")
        initrd = build_initramfs(script=GUEST_SCRIPT)
        port = _free_port()
        uri = f"tcp:127.0.0.1:{port}"
        console_out = tmp_path / "source-console.txt"
        results: dict = {}
        migrated = threading.Event()
        srv = listen()
        streamer = threading.Thread(target=stream_to_guest, args=(srv, results, migrated), daemon=True)
        streamer.start()
        dest_thread = threading.Thread(target=lambda: results.setdefault("dest", run_guest(
            [sys.executable, "-m", "kvmpy", "--log-level", "info", "boot", "--incoming", uri,
             "--kernel", str(stock_bzimage), "--initrd", str(initrd), "--append", APPEND, "--serial", "stdio",
             "--no-reboot", "-m", "512M", "--smp", "2",
             "--nic", f"tap,ifname={DEST_TAP},br={BRIDGE},mac={GUEST_MAC},vhost={dest_vhost}"],
            DEST_TIMEOUT_S, "destination")), daemon=True)
        dest_thread.start()
        source = run_guest([sys.executable, "-c", SOURCE, str(stock_bzimage), str(initrd), APPEND,
                            f"tap,ifname={SOURCE_TAP},br={BRIDGE},mac={GUEST_MAC},vhost={source_vhost}", uri,
                            str(console_out)], TIMEOUT_S, "source")
        migrated.set()          # the source process ended: its TAP left the bridge with it
        if "KVMPY-MIGRATED postmigrate" in source.output:
            streamer.join(TIMEOUT_S)
            results["diagnosis"] = diagnosis()
            dest_thread.join(DEST_TIMEOUT_S + 30)
        else:                   # end the waits now rather than in minutes: the streamer's accept,
            try:                # and the destination's (a peer that sends nothing)
                srv.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
            except OSError:
                pass
            streamer.join(10)
            dest_thread.join(60)
    finally:
        _remove_links()
    out = source.output
    assert "KVMPY-MIGRATED postmigrate" in out and source.exit_status == 0, "the source did not migrate"
    print(re.search(r"KVMPY-MIGRATED.*", out).group(0))
    dest = results.get("dest")
    assert dest is not None, "the destination process did not end within its timeout"
    print("\n".join(re.findall(r"KVMPY-PROGRESS.*", dest.output)[-3:]))
    print(results.get("diagnosis"))
    if source_vhost == "on":
        assert "vhost-net: 2 ring(s) in the kernel" in out, "the source's NIC did not run on vhost-net"
        logged = re.search(r"vhost dirty log: (\d+) page\(s\) written by vhost-net", out)
        assert logged and int(logged.group(1)) > 0, "vhost-net's log recorded nothing during the migration"
        print(logged.group(0))
    assert "KVMPY-STREAMING" in console_out.read_text(), "the guest was not receiving when the migration began"
    assert "error" not in results, {k: v for k, v in results.items() if k != "dest"}
    assert results.get("at-switchover", 0) >= STREAMING_AT, results
    size, sha = results["sent"]
    assert size > results["at-switchover"], "L1 sent nothing after the switchover"
    assert ("vhost-net: 2 ring(s) in the kernel" in dest.output) == (dest_vhost == "on")
    received = re.search(r"KVMPY-RX.*", dest.output)
    assert f"KVMPY-RX {size} {sha}" in dest.output, (f"L1 sent {size} bytes, sha256 {sha}; the guest: "
                                                     f"{received.group(0) if received else 'no KVMPY-RX line'}")
    assert dest.test_rc == 0 and SCRIPT_DONE in dest.output and dest.exit_status == 0, \
        f"rc={dest.test_rc} status={dest.exit_status}"
