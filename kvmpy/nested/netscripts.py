"""Guest-side scripts (busybox sh) for the tier-2 network tests: the L2 guest's virtio-net gets a
link-local address and exchanges traffic with the L1 host on the other side of the TAP.

Only link-local 169.254.0.0/16 addresses on interfaces the test creates: no traffic leaves L1.
Every wait in the guest is under busybox `timeout`, so a lost packet ends the script, not the run;
the guest init runs it under `sh -e -o pipefail`, so KVMPY-SCRIPT-DONE means every step passed.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from kvmpy.errors import NestedError

TCP_TO_GUEST_PORT, TCP_FROM_GUEST_PORT, GUEST_LISTEN_PORT = 5001, 5002, 5003
LISTEN_MARKER = "KVMPY-LISTEN"
SCRIPT_DONE = "KVMPY-SCRIPT-DONE"   # the last line: the guest runs scripts under sh -e -o pipefail


def guest_net_script(guest_ip: str, host_ip: str, prefix: int = 16) -> str:
    """Bring eth0 up at `guest_ip`, ping the host, fetch a payload over TCP (port 5001), send
    it back (5002), then accept one connection from the host (5003). Markers name each step."""
    return f"""\
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
ip addr add {guest_ip}/{prefix} dev eth0 && ip link set eth0 up || {{ echo KVMPY-NET-SETUP-FAILED; exit 21; }}
echo "KVMPY-NET-MAC $(cat /sys/class/net/eth0/address)"
echo "KVMPY-NET-FEATURES $(cat /sys/class/net/eth0/device/features 2>/dev/null)"
n=0   # the host may still be giving its side of the link an address: wait for a first reply
until timeout 5 ping -c 1 -W 2 {host_ip} > /dev/null 2>&1 || [ $n -ge 20 ]; do n=$((n+1)); done
if timeout 30 ping -c 3 -W 5 {host_ip} > /tmp/ping.out 2>&1; then echo KVMPY-PING-OK; else cat /tmp/ping.out; exit 22; fi
timeout 60 nc {host_ip} {TCP_TO_GUEST_PORT} < /dev/null > /tmp/rx.bin
echo "KVMPY-RX $(wc -c < /tmp/rx.bin) $(sha256sum /tmp/rx.bin | cut -d' ' -f1)"
timeout 60 nc {host_ip} {TCP_FROM_GUEST_PORT} < /tmp/rx.bin > /dev/null
echo KVMPY-SENT
echo {LISTEN_MARKER}
timeout 60 nc -l -p {GUEST_LISTEN_PORT} < /dev/null > /tmp/fromhost.txt
echo "KVMPY-FROM-HOST $(cat /tmp/fromhost.txt)"
grep -i virtio /proc/interrupts | sed 's/^/KVMPY-IRQ /'
echo {SCRIPT_DONE}
"""


# --- iperf3 in the guest ------------------------------------------------------------------
# The Debian iperf3 package is dynamically linked: the guest image gets the binary, every
# library `ldd` names (by the path the dynamic loader searches) and the loader itself; the
# guest script marks the binary and the loader executable (image members are 0644).
IPERF3_GUEST_PATH = "bin/iperf3"
IPERF3_PREPARE = ("chmod 755 /bin/iperf3 /lib64/ld-linux-x86-64.so.2\n"
                  "export LD_LIBRARY_PATH=/lib/x86_64-linux-gnu\n")


def iperf3_guest_files(binary: str = "/usr/bin/iperf3") -> dict[str, Path]:
    """Image path -> host file for iperf3 and its shared libraries (for build_guest_initramfs's
    `files`). Raises NestedError naming the package when iperf3 is not installed."""
    if not Path(binary).is_file():
        raise NestedError("finding iperf3", detail=f"{binary} is missing: install the iperf3 package (make deps)")
    try:
        out = subprocess.run(["ldd", binary], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NestedError("listing iperf3's libraries", detail=str(e)) from None
    files: dict[str, Path] = {IPERF3_GUEST_PATH: Path(binary)}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+) => (/\S+) \(", line)
        if m:   # libfoo.so.N => /lib/x86_64-linux-gnu/libfoo.so.N: under its soname, resolved
            files[f"lib/x86_64-linux-gnu/{m.group(1)}"] = Path(m.group(2)).resolve()
        elif (m := re.match(r"\s*(/\S*ld-linux\S*) \(", line)):
            files["lib64/ld-linux-x86-64.so.2"] = Path(m.group(1)).resolve()
    if "lib64/ld-linux-x86-64.so.2" not in files:
        raise NestedError("listing iperf3's libraries", detail=f"no dynamic loader in: {out.strip()[:200]}")
    return files


# --- scripts for the multi-NIC, link and reboot cases ---------------------------------
_SETUP = """\
ip link set lo up
n=0
while [ ! -e /sys/class/net/eth0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
"""


def _wait_ping(host_ip: str, tries: int = 20) -> str:
    return f"n=0; until timeout 5 ping -c 1 -W 2 {host_ip} >/dev/null 2>&1 || [ $n -ge {tries} ]; do n=$((n+1)); done\n"


def two_nics_script(nics: list[tuple[str, str, str, str]]) -> str:
    """Each (mac, guest_ip/prefix, host_ip, tag): find the interface by its MAC, address it,
    ping its host, fetch one line over TCP (port TCP_TO_GUEST_PORT) and print it with `tag`."""
    s = _SETUP + "while [ ! -e /sys/class/net/eth1 ] && [ $n -lt 200 ]; do sleep 0.1; n=$((n+1)); done\n"
    for mac, guest_cidr, host_ip, tag in nics:
        s += (f"i=$(grep -l {mac} /sys/class/net/eth*/address | cut -d/ -f5)\n"
              f"echo \"KVMPY-IF-{tag} $i\"\n"
              f"ip addr add {guest_cidr} dev $i && ip link set $i up\n")
    for mac, guest_cidr, host_ip, tag in nics:
        s += _wait_ping(host_ip)
        s += f"timeout 30 ping -c 2 -W 5 {host_ip} >/dev/null && echo KVMPY-PING-{tag}-OK\n"
        s += f"echo \"KVMPY-FROM-{tag} $(timeout 30 nc {host_ip} {TCP_TO_GUEST_PORT} < /dev/null)\"\n"
    return s + f"echo {SCRIPT_DONE}\n"


def link_script(guest_ip: str, host_ip: str) -> str:
    """Ping the host, then wait for the carrier to drop (the host set the link down), check that
    nothing gets through, wait for it to come back and ping again. Markers name each step."""
    carrier = "$(cat /sys/class/net/eth0/carrier)"
    wait_for = ("n=0; until [ \"" + carrier + "\" = {v} ] || [ $n -ge 900 ]; do sleep 0.1; n=$((n+1)); done\n"
                "echo \"KVMPY-CARRIER " + carrier + "\"\n")
    return (_SETUP + f"ip addr add {guest_ip}/16 dev eth0 && ip link set eth0 up\n" + _wait_ping(host_ip)
            + f"timeout 30 ping -c 2 -W 5 {host_ip} >/dev/null && echo KVMPY-LINK-1-OK\n"
            + wait_for.format(v=0)
            + f"if timeout 10 ping -c 2 -W 2 {host_ip} >/dev/null 2>&1; then echo KVMPY-PING-WHILE-DOWN; "
              "else echo KVMPY-NO-PING-WHILE-DOWN; fi\necho KVMPY-DOWN-CHECKED\n"
            + wait_for.format(v=1) + _wait_ping(host_ip)
            + f"timeout 30 ping -c 2 -W 5 {host_ip} >/dev/null && echo KVMPY-LINK-2-OK\necho {SCRIPT_DONE}\n")


def reboot_script(guest_ip: str, host_ip: str) -> str:
    """Every boot: ping the host and ask it (TCP_TO_GUEST_PORT) what to do next: `reboot`
    (a guest-initiated reboot, the rings are set up again) or anything else (end the script)."""
    return (_SETUP + f"ip addr add {guest_ip}/16 dev eth0 && ip link set eth0 up\n" + _wait_ping(host_ip)
            + f"timeout 30 ping -c 2 -W 5 {host_ip} >/dev/null && echo KVMPY-PING-OK\n"
            + f"cmd=$(timeout 30 nc {host_ip} {TCP_TO_GUEST_PORT} < /dev/null)\necho \"KVMPY-NET-CMD $cmd\"\n"
            + "if [ \"$cmd\" = reboot ]; then reboot -f; sleep 30; fi\n" + f"echo {SCRIPT_DONE}\n")
