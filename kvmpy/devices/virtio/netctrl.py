"""virtio-net's control side (virtio 1.2 section 5.1.6.5): the receive filter the control queue
programs (receive modes, MAC tables), the decoding of control commands, the device's state and
counters, and what the device needs of its backends (the TAP, the vhost offload).

Everything here comes from the guest: lengths and counts are checked against what the command
actually carries, tables are bounded (beyond MAC_TABLE_ENTRIES the filter overflows to "accept
that class", as QEMU does), and a malformed command is answered VIRTIO_NET_ERR, never raised.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Protocol

from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.errors import StateError
from kvmpy.state import check_bytes, check_int, expect_state, versioned

# Feature bits (section 5.1.3)
F_CSUM, F_GUEST_CSUM, F_CTRL_GUEST_OFFLOADS, F_MTU, F_MAC = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO = 1 << 7, 1 << 8, 1 << 9, 1 << 10
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO = 1 << 11, 1 << 12, 1 << 13, 1 << 14
F_MRG_RXBUF, F_STATUS, F_CTRL_VQ, F_CTRL_RX = 1 << 15, 1 << 16, 1 << 17, 1 << 18
F_GUEST_ANNOUNCE, F_MQ, F_CTRL_MAC_ADDR = 1 << 21, 1 << 22, 1 << 23
GUEST_OFFLOADS = F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_GUEST_ECN | F_GUEST_UFO
HOST_OFFLOADS = F_CSUM | F_HOST_TSO4 | F_HOST_TSO6 | F_HOST_ECN | F_HOST_UFO

class NetBackend(Protocol):
    """What the device needs of the TAP: one non-blocking fd per queue pair carrying
    header-prefixed frames, and a way to say which offloads the guest accepts."""
    fds: list[int]

    def set_guest_offloads(self, offloads: int) -> None: ...


class NetOffload(Protocol):
    """A kernel data path (vhost-net) for the rx/tx rings."""

    def start(self, queues: list[Virtqueue], features: int, pairs: int) -> None: ...

    def stop(self) -> None: ...          # indices written back into the Virtqueues

    def kick(self, queue_index: int) -> None: ...


@dataclass
class NetStats:
    rx_packets: int = 0
    rx_bytes: int = 0
    rx_dropped: int = 0       # no room in the guest's buffers, or a TAP read error
    rx_filtered: int = 0      # refused by the receive filter
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_dropped: int = 0       # malformed by the guest (short, oversize, unnegotiated offload) or TAP refused
    bad_buffers: int = 0      # guest rx buffers too small to hold a header
    ctrl_errors: int = 0
    ring_errors: int = 0      # a ring's indices found moved behind the device (netring.RingWatch)


# Control classes and commands
CTRL_RX, CTRL_MAC, CTRL_VLAN, CTRL_ANNOUNCE, CTRL_MQ, CTRL_GUEST_OFFLOADS = 0, 1, 2, 3, 4, 5
RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST = range(6)
MAC_TABLE_SET, MAC_ADDR_SET = 0, 1
ANNOUNCE_ACK = 0
MQ_VQ_PAIRS_SET = 0
GUEST_OFFLOADS_SET = 0
VIRTIO_NET_OK, VIRTIO_NET_ERR = 0, 1
MAC_TABLE_ENTRIES = 64                 # QEMU's size; more entries overflow to "accept all"
MAX_CTRL_BYTES = 2 + 2 * (4 + 6 * 4096)  # a generous bound on one command's readable bytes
BROADCAST = b"\xff" * 6
_RX_MODE_NAMES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")


@versioned("virtio-net-rx-filter", 1)
@dataclass
class RxFilter:
    """Which destination MACs the guest wants to receive. After reset the device is promiscuous
    (QEMU does the same: a driver without the control queue cannot ask for anything else)."""
    promisc: bool = True
    allmulti: bool = False
    alluni: bool = False
    nomulti: bool = False
    nouni: bool = False
    nobcast: bool = False
    uni_macs: list[bytes] = field(default_factory=list)
    multi_macs: list[bytes] = field(default_factory=list)
    uni_overflow: bool = False
    multi_overflow: bool = False

    def accepts(self, dest: bytes, own_mac: bytes) -> bool:
        """Does a frame for `dest` (its first six bytes) pass the filter?"""
        if self.promisc:
            return True
        if dest == BROADCAST:
            return not self.nobcast
        if dest[0] & 1:
            if self.nomulti:
                return False
            return self.allmulti or self.multi_overflow or dest in self.multi_macs
        if self.nouni:
            return False
        return dest == own_mac or self.alluni or self.uni_overflow or dest in self.uni_macs

    def set_mode(self, cmd: int, on: bool) -> bool:
        if not 0 <= cmd < len(_RX_MODE_NAMES):
            return False
        setattr(self, _RX_MODE_NAMES[cmd], on)
        return True

    def set_tables(self, data: bytes) -> bool:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET: two {le32 entries; u8 macs[entries][6]} back to back."""
        tables: list[list[bytes]] = []
        overflow: list[bool] = []
        pos = 0
        for _ in range(2):
            if pos + 4 > len(data):
                return False
            (entries,) = struct.unpack_from("<I", data, pos)
            pos += 4
            if entries > (len(data) - pos) // 6:
                return False
            macs = [bytes(data[pos + 6 * i:pos + 6 * i + 6]) for i in range(min(entries, MAC_TABLE_ENTRIES))]
            pos += 6 * entries
            tables.append(macs)
            overflow.append(entries > MAC_TABLE_ENTRIES)
        if pos != len(data):
            return False
        self.uni_macs, self.multi_macs = tables
        self.uni_overflow, self.multi_overflow = overflow
        return True


class ControlTarget(Protocol):
    """The parts of the device a control command may change."""
    rx_filter: RxFilter
    mac: bytes
    announce_pending: bool
    queue_pairs: int
    max_pairs: int
    driver_features: int

    def set_guest_offloads(self, offloads: int) -> None: ...


def apply_command(dev: ControlTarget, data: bytes, has: Callable[[int], bool]) -> bool:
    """Carry out one control request (class, command, payload); False means VIRTIO_NET_ERR:
    unknown, unnegotiated, or with a payload of the wrong size."""
    if len(data) < 2:
        return False
    cls, cmd, payload = data[0], data[1], bytes(data[2:])
    if cls == CTRL_RX and has(F_CTRL_RX) and len(payload) == 1:
        return dev.rx_filter.set_mode(cmd, bool(payload[0]))
    if cls == CTRL_MAC and cmd == MAC_TABLE_SET and has(F_CTRL_RX):
        return dev.rx_filter.set_tables(payload)
    if cls == CTRL_MAC and cmd == MAC_ADDR_SET and has(F_CTRL_MAC_ADDR):
        if len(payload) != 6 or payload[0] & 1:
            return False
        dev.mac = payload
        return True
    if cls == CTRL_ANNOUNCE and cmd == ANNOUNCE_ACK and not payload:
        dev.announce_pending = False
        return True
    if cls == CTRL_MQ and cmd == MQ_VQ_PAIRS_SET and has(F_MQ) and len(payload) == 2:
        (pairs,) = struct.unpack("<H", payload)
        if not 1 <= pairs <= dev.max_pairs:
            return False
        dev.queue_pairs = pairs
        return True
    if cls == CTRL_GUEST_OFFLOADS and cmd == GUEST_OFFLOADS_SET and has(F_CTRL_GUEST_OFFLOADS) \
            and len(payload) == 8:
        (offloads,) = struct.unpack("<Q", payload)
        if offloads & ~(dev.driver_features & GUEST_OFFLOADS):
            return False
        dev.set_guest_offloads(offloads)
        return True
    return False


@versioned("virtio-net", 1)
@dataclass
class NetState:
    """virtio-net's own state (the rings are the transport's). A frame waiting for rx buffers
    is not kept: on the wire that is a lost packet, which TCP and ARP already survive."""
    mac: bytes
    link_up: bool
    announce: bool
    queue_pairs: int
    guest_offloads: int
    rx_filter: RxFilter = field(default_factory=RxFilter)


def validate_state(state: object, max_pairs: int, offered_offloads: int) -> NetState:
    """Every check restore() needs, before the device is touched (the state may come from an
    untrusted migration stream)."""
    what = "virtio-net"
    s = expect_state(state, NetState, what)
    check_bytes(what, "mac", s.mac, size=6)
    check_int(what, "queue_pairs", s.queue_pairs, lo=1, hi=max_pairs)
    check_int(what, "guest_offloads", s.guest_offloads, bits=64)
    if s.guest_offloads & ~offered_offloads:
        raise StateError(f"restoring {what}", detail=f"guest_offloads={s.guest_offloads:#x} not offered")
    f = expect_state(s.rx_filter, RxFilter, f"{what} receive filter")
    for name in ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast", "uni_overflow",
                 "multi_overflow"):
        if not isinstance(getattr(f, name), bool):
            raise StateError(f"restoring {what}", detail=f"rx_filter.{name} is not a bool")
    for name in ("uni_macs", "multi_macs"):
        table = getattr(f, name)
        if not isinstance(table, list) or len(table) > MAC_TABLE_ENTRIES:
            raise StateError(f"restoring {what}", detail=f"rx_filter.{name}: not a list of <= {MAC_TABLE_ENTRIES}")
        for m in table:
            check_bytes(what, f"rx_filter.{name}[]", m, size=6)
    if not isinstance(s.link_up, bool) or not isinstance(s.announce, bool):
        raise StateError(f"restoring {what}", detail="link_up/announce are not bools")
    return s
