"""A TAP device for virtio-net: opened through /dev/net/tun with IFF_TAP | IFF_NO_PI |
IFF_VNET_HDR (plus IFF_MULTI_QUEUE and one fd per queue pair when queues > 1), its header size
set to the 12-byte virtio_net_hdr_v1 so frames pass between guest and TAP unchanged, put on a
bridge with pyroute2 and brought up.

Creation is TUNSETIFF on a name that does not exist yet, without TUNSETPERSIST: the kernel then
removes the interface when kvmpy's last fd closes, at exit or on a crash or SIGKILL alike, which
creating it persistent through netlink could not promise. A TAP that already exists (made by the
user, e.g. `ip tuntap add tap0 mode tap multi_queue`) is attached as it is and left behind.

Only a bridge needs pyroute2 (netlink's IFLA_MASTER, and the check that it is a bridge): a TAP
is found and brought up with the standard library (if_nametoindex, SIOCGIFFLAGS/SIOCSIFFLAGS),
because importing pyroute2 costs ~0.35 s here and about 6 s of CPU in L1, more than the rest of
kvmpy's start-up.
"""
from __future__ import annotations

import errno as E
import fcntl
import logging
import os
import socket
import struct

import ioctl_opt

from kvmpy.errors import DeviceError

log = logging.getLogger(__name__)

TUN_PATH = "/dev/net/tun"
_T = ord("T")
TUNSETIFF = ioctl_opt.IOW(_T, 202, ioctl_opt.ctypes.c_int)
TUNSETOFFLOAD = ioctl_opt.IOW(_T, 208, ioctl_opt.ctypes.c_uint)
TUNGETIFF = ioctl_opt.IOR(_T, 210, ioctl_opt.ctypes.c_uint)
TUNSETVNETHDRSZ = ioctl_opt.IOW(_T, 216, ioctl_opt.ctypes.c_int)
TUNGETSNDBUF = ioctl_opt.IOR(_T, 211, ioctl_opt.ctypes.c_int)
TUNSETSNDBUF = ioctl_opt.IOW(_T, 212, ioctl_opt.ctypes.c_int)
# QEMU's default (tap_set_sndbuf with sndbuf=0): no send-buffer flow control. Left at the socket
# default (net.core.wmem_default, ~208 KiB, a few TSO frames), a transmit burst from the guest
# (vhost's, or ours) gets EAGAIN and waits for the host to free what it already took.
TAP_SNDBUF = 2**31 - 1
IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, IFF_MULTI_QUEUE = 0x0002, 0x1000, 0x4000, 0x0100
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO = 0x01, 0x02, 0x04, 0x08, 0x10
VNET_HDR_LEN = 12
_IFREQ = struct.Struct("16sH22x")            # struct ifreq: name, then ifr_flags in the union
# virtio-net guest offload feature bits -> what TUNSETOFFLOAD calls them
_GUEST_CSUM, _GUEST_TSO4, _GUEST_TSO6, _GUEST_ECN, _GUEST_UFO = 1 << 1, 1 << 7, 1 << 8, 1 << 9, 1 << 10


def tun_offload_flags(guest_offloads: int) -> int:
    """TUNSETOFFLOAD flags for the virtio-net GUEST_* offloads the guest accepts: segmentation
    only with checksum offload, as the TAP requires (QEMU's tap_fd_set_offload does the same)."""
    if not guest_offloads & _GUEST_CSUM:
        return 0
    flags = TUN_F_CSUM
    for bit, tun in ((_GUEST_TSO4, TUN_F_TSO4), (_GUEST_TSO6, TUN_F_TSO6), (_GUEST_UFO, TUN_F_UFO)):
        if guest_offloads & bit:
            flags |= tun
    if guest_offloads & _GUEST_ECN and flags & (TUN_F_TSO4 | TUN_F_TSO6):
        flags |= TUN_F_TSO_ECN
    return flags


SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1


def _existing_index(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


def _bring_up(name: str) -> None:
    """Set IFF_UP on interface `name` (a no-op when it is up already)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        flags = _IFREQ.unpack(fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ.pack(name.encode(), 0)))[1]
        if not flags & IFF_UP:
            fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ.pack(name.encode(), flags | IFF_UP))


def _ip():
    """pyroute2's IPRoute, imported only when a TAP is created or bridged (it is slow to import)."""
    from pyroute2 import IPRoute
    return IPRoute()


def _link_index(ipr, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


class Tap:
    """One TAP interface and kvmpy's fds on it (one per queue pair). `fds` are non-blocking."""

    def __init__(self, ifname: str = "", queues: int = 1, bridge: str = "", path: str = TUN_PATH):
        self.fds: list[int] = []
        self.ifname = ifname
        self.queues = queues
        self.created = not ifname or _existing_index(ifname) is None
        ipr = _ip() if bridge else None     # pyroute2 only for a bridge: the rest is the standard library
        try:
            bridge_index = self._bridge_index(ipr, bridge) if ipr is not None else None   # before any TAP
            for _ in range(queues):
                self.fds.append(self._open_queue(path))
            if ipr is not None:
                ipr.link("set", index=socket.if_nametoindex(self.ifname), master=bridge_index)
            _bring_up(self.ifname)
        except DeviceError:
            self.close()
            raise
        except OSError as e:   # pyroute2's NetlinkError is an OSError with the errno
            self.close()
            raise DeviceError(f"setting up TAP {self.ifname}", errno=e.errno) from None
        finally:
            if ipr is not None:
                ipr.close()
        log.info("TAP %s: %s, %d queue(s)%s", self.ifname, "created" if self.created else "existing",
                 queues, f", on bridge {bridge}" if bridge else "")

    @staticmethod
    def _bridge_index(ipr, bridge: str) -> int:
        index = _link_index(ipr, bridge)
        if index is None:
            raise DeviceError(f"attaching the TAP to bridge {bridge}", detail="no such interface")
        info = ipr.get_links(index)[0].get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        if kind != "bridge":
            raise DeviceError(f"attaching the TAP to bridge {bridge}", detail=f"{bridge} is a {kind or 'plain'} "
                                                                               "interface, not a bridge")
        return index

    def _open_queue(self, path: str) -> int:
        what = f"opening TAP {self.ifname or '(new)'}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            hint = "load the tun module (modprobe tun)" if e.errno == E.ENOENT else \
                "needs CAP_NET_ADMIN or access to it" if e.errno in (E.EACCES, E.EPERM) else None
            raise DeviceError(f"{what}: {path}", errno=e.errno, detail=hint) from None
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if self.queues > 1 else 0)
        try:
            res = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(self.ifname.encode(), flags))
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
        except OSError as e:
            os.close(fd)
            raise DeviceError(what, errno=e.errno, detail=self._why(e.errno)) from None
        self.ifname = _IFREQ.unpack(res)[0].rstrip(b"\0").decode()
        try:
            fcntl.ioctl(fd, TUNSETSNDBUF, struct.pack("i", TAP_SNDBUF))
        except OSError as e:    # as QEMU without sndbuf=: a speed setting, never a reason to fail
            log.debug("TAP %s: TUNSETSNDBUF failed (%s); the default send buffer stays", self.ifname, e)
        return fd

    def _why(self, errno: int | None) -> str | None:
        if errno == E.EPERM:
            return "creating or attaching a TAP needs CAP_NET_ADMIN (run as root or give kvmpy the capability)"
        if errno == E.EBUSY:
            return f"{self.ifname} is in use by another process (or lacks multi_queue for queues={self.queues})"
        if errno == E.EINVAL:
            return f"{self.ifname} exists but is not a TAP that takes these flags (tap, vnet_hdr" \
                   + (", multi_queue)" if self.queues > 1 else ")")
        return None

    def set_guest_offloads(self, guest_offloads: int) -> None:
        """Tell the TAP which offloads the guest accepts (virtio-net GUEST_* feature bits), so the
        host hands it only frames it can take."""
        flags = tun_offload_flags(guest_offloads)
        for fd in self.fds:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            except OSError as e:
                raise DeviceError(f"TUNSETOFFLOAD {flags:#x} on TAP {self.ifname}", errno=e.errno) from None

    def close(self) -> None:
        """Close kvmpy's fds; a TAP kvmpy created goes away with the last of them."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:   # interpreter shutdown
            pass
