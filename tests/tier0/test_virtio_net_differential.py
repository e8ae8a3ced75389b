"""The C virtio-net data path (kvmpy/ioctl/netfast.c) against the Python one (netpath.place,
VirtioNet._send), byte for byte (no /dev/kvm).

Random traffic both ways, from well-formed frames and buffers to hostile rings (buffers too short
for a header, readable where writable belongs, outside RAM, over the rings, avail jumps, raw
descriptor pokes), with the receive filter in every mode (promiscuous, MAC tables, overflow),
mergeable buffers on or off, event index on or off and the link going down and up, is played on
two identical worlds, one per path. Guest RAM, every used entry seen, the frames the host got,
the counters, the watch calls, whether the device broke and every warning must all match.
"""
from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass, field

from hypothesis import HealthCheck, event, given, settings, strategies as st

from hypothesis_budget import examples
from kvmpy.devices.virtio import fastpath, netctrl, netpath
from kvmpy.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX
from kvmpy.devices.virtio.net import HDR_LEN, VirtioNet
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.memslots import GuestMemory
from support.mock_driver import BumpAllocator, MockPciDriver, MockQueue

RAM = 1 << 20
RINGS, CTRL, CTRL_ACK, TXBUF, RXBUF = 0x10000, 0x20000, 0x21000, 0x30000, 0x60000
MAC = bytes.fromhex("525400123456")
UNI, MULTI, OTHER_MULTI = bytes.fromhex("525400abcdef"), bytes.fromhex("333300000001"), bytes.fromhex("01005e000009")
DESTS = [MAC, UNI, bytes.fromhex("02aabbccddee"), b"\xff" * 6, MULTI, OTHER_MULTI]
QSIZE = 64


def test_c_net_path_is_built():
    assert netpath.AVAILABLE, "kvmpy.ioctl._kvm lacks kvmpy_net_rx: rebuild it (make venv)"


def frame_bytes(dest: int, length: int, seed: int, hdr: bytes = bytes(HDR_LEN)) -> bytes:
    body = bytes((seed + 7 * i) & 0xFF for i in range(max(0, length - HDR_LEN - 12)))
    return (hdr + DESTS[dest % len(DESTS)] + MAC + body)[:max(length, 0)]


rx_seg = st.one_of(
    st.tuples(st.integers(0, 255).map(lambda k: RXBUF + k * 0x700), st.sampled_from([1500, 1526, 2048, 4096, 8, 12, 13]),
              st.just(True)),
    st.tuples(st.integers(RXBUF, RAM), st.integers(0, 0x3000), st.booleans()),
    st.tuples(st.sampled_from([RINGS, RAM - 100, RAM, 2**64 - 64]), st.integers(0, 200), st.just(True)))
frame_len = st.one_of(st.integers(0, 1600), st.sampled_from([HDR_LEN + 13, HDR_LEN + 14, 9014, 30000, 65549]))
hdr_st = st.tuples(st.sampled_from([0, 0, 1, 2]), st.sampled_from([0, 0, 1, 3, 4, 5, 0x81, 0x80])).map(
    lambda fg: struct.pack("<BBHHHHH", fg[0], fg[1], 0, 0, 0, 0, 0))
tame_op_st = st.one_of(
    st.tuples(st.just("exchange"), st.lists(st.tuples(st.sampled_from([0, 0, 3, 1, 4]), frame_len), min_size=1, max_size=4),
              st.sampled_from([1526, 2048, 4096])),
    st.tuples(st.just("rxmany"), st.integers(1, 40), st.sampled_from([1526, 2048, 4096])),
    st.tuples(st.just("send"), st.integers(0, 5), frame_len, st.integers(0, 255)),
    st.tuples(st.just("send"), st.sampled_from([0, 3]), st.integers(60, 1600), st.integers(0, 255)),
    st.tuples(st.just("tx"), st.integers(0, 5), st.integers(26, 2000), st.just(bytes(HDR_LEN)),
              st.lists(st.integers(1, 20), max_size=2)),
    st.tuples(st.just("readable")), st.tuples(st.just("notify"), st.integers(0, 1)),
    st.tuples(st.just("ctrl"), st.sampled_from(["nopromisc", "allmulti", "table", "promisc"])),
    st.tuples(st.just("link"), st.booleans()))
op_st = st.one_of(
    st.tuples(st.just("rx"), st.lists(rx_seg, min_size=1, max_size=3)),
    st.tuples(st.just("rxmany"), st.integers(1, 40), st.sampled_from([1526, 2048, 4096])),
    st.tuples(st.just("send"), st.integers(0, 5), frame_len, st.integers(0, 255)),
    st.tuples(st.just("tx"), st.integers(0, 5), frame_len, hdr_st, st.lists(st.integers(1, 64), max_size=3)),
    st.tuples(st.just("readable")), st.tuples(st.just("readable")),
    st.tuples(st.just("notify"), st.integers(0, 2)), st.tuples(st.just("notify"), st.integers(0, 1)),
    st.tuples(st.just("ctrl"), st.sampled_from(["nopromisc", "allmulti", "nouni", "nobcast", "table", "overflow",
                                                "promisc"])),
    st.tuples(st.just("link"), st.booleans()),
    st.tuples(st.just("desc"), st.integers(0, 1), st.integers(0, QSIZE - 1),
              st.tuples(st.integers(0, 2**64 - 1) | st.integers(RXBUF, RAM), st.integers(0, 2**32 - 1) | st.integers(0, 4096),
                        st.integers(0, 7), st.integers(0, 0xFFFF) | st.integers(0, QSIZE))),
    st.tuples(st.just("publish"), st.integers(0, 1), st.integers(0, 0xFFFF) | st.integers(0, QSIZE)),
    st.tuples(st.just("jump"), st.integers(0, 1), st.sampled_from([1, QSIZE + 1, 0x8000])),
)


class Tap:
    def __init__(self) -> None:
        self.dev_end, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.dev_end, self.host):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.fds = [self.dev_end.fileno()]

    def set_guest_offloads(self, offloads: int) -> None:
        pass

    def drain(self) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(self.host.recv(1 << 17))
            except BlockingIOError:
                return out


@dataclass
class World:
    fast: bool
    mem: GuestMemory
    tap: Tap
    net: VirtioNet
    dev: VirtioPciDevice
    drv: MockPciDriver
    qs: list[MockQueue]
    seen: list = field(default_factory=list)
    logs: list = field(default_factory=list)


def build(fast: bool, features_mask: int) -> World:
    mem = GuestMemory.create(RAM)
    tap = Tap()
    saved = fastpath.ENABLED
    fastpath.ENABLED = fast
    try:
        net = VirtioNet(tap, MAC)
        dev = VirtioPciDevice(net, mem)
    finally:
        fastpath.ENABLED = saved
    w = World(fast, mem, tap, net, dev, None, [])  # type: ignore[arg-type]
    net.watch_fd = lambda fd, cb: w.seen.append(("watch", cb is not None))
    w.drv = MockPciDriver(dev, mem, BumpAllocator(RINGS, CTRL))
    assert w.drv.negotiate(w.drv.device_features() & ~features_mask)
    w.qs = [w.drv.setup_queue(i, size=QSIZE) for i in range(3)]
    w.drv.driver_ok()
    assert (dev.queues[0].cring is not None) == fast
    return w


def command(w: World, which: str) -> None:
    cls, cmd, payload = {
        "nopromisc": (netctrl.CTRL_RX, netctrl.RX_PROMISC, b"\x00"), "promisc": (netctrl.CTRL_RX, netctrl.RX_PROMISC, b"\x01"),
        "allmulti": (netctrl.CTRL_RX, netctrl.RX_ALLMULTI, b"\x01"), "nouni": (netctrl.CTRL_RX, netctrl.RX_NOUNI, b"\x01"),
        "nobcast": (netctrl.CTRL_RX, netctrl.RX_NOBCAST, b"\x01"),
        "table": (netctrl.CTRL_MAC, netctrl.MAC_TABLE_SET, struct.pack("<I", 1) + UNI + struct.pack("<I", 1) + MULTI),
        "overflow": (netctrl.CTRL_MAC, netctrl.MAC_TABLE_SET, struct.pack("<I", 65) + UNI * 65 + struct.pack("<I", 0)),
    }[which]
    if not w.qs[2].free:
        return
    w.mem.write(CTRL, bytes([cls, cmd]) + payload)
    w.qs[2].add([(CTRL, 2 + len(payload), False), (CTRL_ACK, 1, True)])
    w.dev.handle_notify(2)
    w.seen.append(("ctrl", w.qs[2].used()))


def apply(w: World, op: tuple) -> None:
    kind, mem = op[0], w.mem
    rx, tx = w.qs[0], w.qs[1]
    if kind == "rx" and len(op[1]) <= len(rx.free):
        rx.add(list(op[1]))
    elif kind == "rxmany":
        for i in range(min(op[1], len(rx.free))):
            rx.add([(RXBUF + (i % 96) * 0x1000, op[2], True)])
    elif kind == "exchange":   # buffers, frames, the TAP's readability: a burst of host->guest traffic
        apply(w, ("rxmany", 40, op[2]))
        for dest, length in op[1]:
            apply(w, ("send", dest, length, length & 0xFF))
        apply(w, ("readable",))
    elif kind == "send":
        try:
            w.tap.host.send(frame_bytes(op[1], op[2], op[3]))
        except OSError as e:
            w.seen.append(("send-failed", e.errno))
    elif kind == "tx":
        _, dest, length, hdr, cuts = op
        data = frame_bytes(dest, length, 3, hdr)
        if not data or len(data) > RXBUF - TXBUF:
            return
        mem.write(TXBUF, data)
        bounds = sorted({0, len(data), *[min(c * 97, len(data)) for c in cuts]})
        segs = [(TXBUF + a, b - a, False) for a, b in zip(bounds, bounds[1:])]
        if segs and len(segs) <= len(tx.free):
            tx.add(segs)
    elif kind == "readable":
        w.net.on_tap_readable(0)
        w.seen.append(("rx-used", rx.used()))
    elif kind == "notify":
        w.dev.handle_notify(op[1])
        w.seen.append(("used", op[1], w.qs[op[1]].used()))
    elif kind == "ctrl":
        command(w, op[1])
    elif kind == "link":
        w.net.set_link(op[1])
    elif kind == "desc":
        w.qs[op[1]].write_desc(op[2], *op[3])
    elif kind == "publish":
        w.qs[op[1]].publish(op[2])
    elif kind == "jump":
        q = w.qs[op[1]]
        q.set_avail_idx(q.avail_idx + op[2])


class _Collect(logging.Handler):
    def __init__(self, world: World):
        super().__init__(logging.WARNING)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        self.world.logs.append(record.getMessage())


def play(w: World, ops: list[tuple]) -> None:
    handler = _Collect(w)
    logger = logging.getLogger("kvmpy")
    logger.addHandler(handler)
    try:
        for op in ops:
            apply(w, op)
        for _ in range(3):     # whatever waits (a burst's rest, frames behind a full ring) gets its turn
            apply(w, ("readable",))
            apply(w, ("notify", 1))
    finally:
        logger.removeHandler(handler)


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.one_of(st.lists(tame_op_st, min_size=1, max_size=24), st.lists(tame_op_st, min_size=1, max_size=24),
                    st.lists(op_st, min_size=1, max_size=24)),
       features_mask=st.sampled_from([0, netctrl.F_MRG_RXBUF, VIRTIO_F_RING_EVENT_IDX,
                                      netctrl.F_MRG_RXBUF | VIRTIO_F_RING_EVENT_IDX, netctrl.F_CSUM | netctrl.F_HOST_ECN]))
def test_c_and_python_net_paths_agree(ops, features_mask):
    worlds = [build(False, features_mask), build(True, features_mask)]
    try:
        for w in worlds:
            play(w, ops)
        py, c = worlds
        event(f"rx packets: {'none' if not py.net.stats.rx_packets else 'some'}; "
              f"tx packets: {'none' if not py.net.stats.tx_packets else 'some'}; broken: {py.dev.broken}")
        assert c.seen == py.seen
        assert c.dev.broken == py.dev.broken
        assert c.logs == py.logs
        assert c.net.stats == py.net.stats
        assert c.tap.drain() == py.tap.drain()
        assert c.mem.read(0, RAM) == py.mem.read(0, RAM)
        assert c.dev.state() == py.dev.state()
    finally:
        for w in worlds:
            w.net.close()
            w.mem.close()
            w.tap.dev_end.close()
            w.tap.host.close()
