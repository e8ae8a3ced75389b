"""Two "hosts" inside one L1, as issue 11 asks for live migration: two network namespaces joined
by a veth pair with link-local addresses, and what can go wrong between them.

Shared by tests/tier2/test_kvmpy_migration_faults.py and benchmarks/migrate_bench.py (which puts
this directory on sys.path). Everything here needs root (namespaces, links); L1 runs as root.

- TwoHosts: the namespaces, the veth pair and its addresses; the link set down and up (a cut
  that sends nothing: no FIN, no RST, packets just vanish, as a pulled cable).
- socket_in(ns): a socket that lives in a namespace, made from a short-lived thread that enters
  it (setns is per thread for network namespaces), so the calling process stays where it is;
  tests/support/faultrelay.py's relay makes its sockets with it to sit inside a namespace.
"""
from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def sh(*argv: str) -> None:
    """Run one setup command; its stderr in the error when it fails."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.returncode}")


def in_ns(ns: str, argv: list[str]) -> list[str]:
    """`argv` run inside namespace `ns` (ip netns exec execs it: the pid is the command's)."""
    return ["ip", "netns", "exec", ns, *argv]


class TwoHosts:
    """Namespaces `<prefix>-src` and `<prefix>-dst`, joined by veth `<prefix>0` (source side,
    `<subnet>.1`) and `<prefix>1` (destination side, `<subnet>.2`) on a /30. Addresses go only on
    interfaces made here; create() first removes any leftovers of an earlier run."""

    def __init__(self, prefix: str, subnet: str = "169.254.77"):
        self.src_ns, self.dst_ns = f"{prefix}-src", f"{prefix}-dst"
        self.src_dev, self.dst_dev = f"{prefix}0", f"{prefix}1"
        self.src_ip, self.dst_ip = f"{subnet}.1", f"{subnet}.2"

    def create(self) -> "TwoHosts":
        self.remove()
        for ns in (self.src_ns, self.dst_ns):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.src_dev, "netns", self.src_ns, "type", "veth",
           "peer", "name", self.dst_dev, "netns", self.dst_ns)
        for ns, dev, ip in ((self.src_ns, self.src_dev, self.src_ip), (self.dst_ns, self.dst_dev, self.dst_ip)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        return self

    def remove(self) -> None:
        """Deleting a namespace deletes its end of the veth, and with it the other end."""
        for ns in (self.src_ns, self.dst_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)

    def set_link(self, up: bool) -> None:
        """The destination's end of the veth down (or up again): the source's packets are
        dropped without a word, as on a cut cable; the connections stay open on both sides."""
        sh("ip", "-n", self.dst_ns, "link", "set", self.dst_dev, "up" if up else "down")

    def __enter__(self) -> "TwoHosts":
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def run_in_ns(ns: str, fn: Callable[[], T]) -> T:
    """fn() on a fresh thread that has entered namespace `ns` (a socket made there stays in it);
    the caller's own threads never change namespace."""
    result: dict[str, object] = {}

    def enter_and_run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            result["value"] = fn()
        except BaseException as exc:     # handed to the caller's thread
            result["error"] = exc
    thread = threading.Thread(target=enter_and_run, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result["value"]  # type: ignore[return-value]


def socket_in(ns: str) -> socket.socket:
    """A TCP/IPv4 socket in namespace `ns`."""
    return run_in_ns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))


def wait_listening(ns: str, port: int, timeout: float = 120.0) -> None:
    """Until something listens on `port` in namespace `ns` (asked with ss: no connection is made,
    so a one-peer listener such as `--incoming tcp:` is not used up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(in_ns(ns, ["ss", "-Hltn", f"sport = :{port}"]), capture_output=True,
                             text=True, timeout=30).stdout
        if out.strip():
            return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on port {port} in {ns} after {timeout:.0f}s")
