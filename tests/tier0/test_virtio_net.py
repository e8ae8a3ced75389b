"""virtio-net through the transport and the mock driver, with a SOCK_SEQPACKET socketpair standing
in for the TAP (both keep frame boundaries): tx, rx, mergeable buffers, filter, control queue,
link state, offload checks, state round trip. Runs on both virtqueue data paths."""
import socket
import struct

import pytest

from kvmpy.devices.virtio import netctrl
from kvmpy.devices.virtio.device import VIRTIO_F_VERSION_1
from support.mock_driver import BumpAllocator, MockPciDriver
from kvmpy.devices.virtio.net import GSO_TCPV4, HDR_LEN, VirtioNet
from kvmpy.devices.virtio.netctrl import F_CSUM, F_CTRL_VQ, F_GUEST_CSUM, F_HOST_TSO4, F_MAC, F_MRG_RXBUF
from kvmpy.errors import StateError
from kvmpy.memslots import GuestMemory

MAC = bytes.fromhex("525400123456")
OTHER = bytes.fromhex("525400abcdef")
BUF = 0x80000


class FakeTap:
    """The device's end of a socketpair plus what the device asked of the TAP."""

    def __init__(self, pairs=1):
        self.ends = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(pairs)]
        for dev_end, host_end in self.ends:
            dev_end.setblocking(False)
            host_end.setblocking(False)
        self.fds = [d.fileno() for d, _ in self.ends]
        self.offloads = []

    def set_guest_offloads(self, offloads):
        self.offloads.append(offloads)

    def host(self, pair=0):
        return self.ends[pair][1]

    def close(self):
        for a, b in self.ends:
            a.close()
            b.close()


def frame(dest=MAC, payload=b"x" * 50, hdr=bytes(HDR_LEN)):
    return hdr + dest + OTHER + b"\x08\x00" + payload


@pytest.fixture
def mem():
    m = GuestMemory.create(2 << 20)
    yield m
    m.close()


def start(mem, features=None, pairs=1, watch=None):
    tap = FakeTap(pairs)
    net = VirtioNet(tap, MAC, queue_pairs=pairs)
    from kvmpy.devices.virtio.transport import VirtioPciDevice
    dev = VirtioPciDevice(net, mem)
    net.watch_fd = (lambda fd, cb: watch.append((tap.fds.index(fd), cb is not None))) if watch is not None else None
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x70000))
    qs = drv.start(net.num_queues if features is None or features & F_CTRL_VQ else 2, features)
    return net, dev, drv, qs, tap


def test_config_space_and_features(mem, datapath):
    net, dev, drv, qs, tap = start(mem)
    assert bytes(drv.config(i, 1) for i in range(6)) == MAC
    assert drv.config(6, 2) == 1 and drv.config(8, 2) == 1 and drv.config(10, 2) == 1500
    assert tap.offloads[-1] == net.driver_features & netctrl.GUEST_OFFLOADS != 0


def test_transmit_writes_header_and_frame(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    f = frame()
    mem.write(BUF, f[:5])           # header split over two descriptors
    mem.write(BUF + 0x100, f[5:])
    head = tx.add([(BUF, 5, False), (BUF + 0x100, len(f) - 5, False)])
    drv.notify(1)
    assert tap.host().recv(4096) == f
    assert tx.used() == [(head, 0)] and net.stats.tx_packets == 1


@pytest.mark.parametrize("length", [0, 5, HDR_LEN, HDR_LEN + 13, HDR_LEN + 70000])
def test_transmit_drops_bad_lengths(mem, datapath, length):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    tx.add([(BUF, length, False)] if length else [(BUF, 16, True)])
    drv.notify(1)
    assert len(tx.used()) == 1 and net.stats.tx_dropped == 1 and not dev.broken
    with pytest.raises(BlockingIOError):
        tap.host().recv(4096)


def test_transmit_refuses_unnegotiated_offloads(mem, datapath):
    features = VIRTIO_F_VERSION_1 | F_MAC
    net, dev, drv, (rx, tx), tap = start(mem, features)
    for hdr in (struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 16, 0), struct.pack("<BBHHHHH", 0, GSO_TCPV4, 54, 1448, 0, 0, 0),
                struct.pack("<BBHHHHH", 0, 7, 0, 0, 0, 0, 0)):
        mem.write(BUF, frame(hdr=hdr))
        tx.add([(BUF, len(frame()), False)])
    drv.notify(1)
    assert net.stats.tx_dropped == 3 and net.stats.tx_packets == 0
    net2, dev2, drv2, (rx2, tx2, _), tap2 = start(mem, VIRTIO_F_VERSION_1 | F_CSUM | F_HOST_TSO4 | F_CTRL_VQ)
    hdr = struct.pack("<BBHHHHH", 1, GSO_TCPV4, 54, 1448, 34, 16, 0)
    mem.write(BUF, frame(hdr=hdr))
    tx2.add([(BUF, len(frame()), False)])
    drv2.notify(1)
    assert tap2.host().recv(4096)[:HDR_LEN] == hdr


def test_receive_single_buffer_sets_num_buffers(mem, datapath):
    watch = []
    net, dev, drv, (rx, tx), tap = start(mem, VIRTIO_F_VERSION_1 | F_MAC, watch=watch)
    assert watch == [(0, True)]
    f = frame()
    head = rx.add([(BUF, 2048, True)])
    tap.host().send(f)
    net.tap_readable(0)
    ((h, n),) = rx.used()
    assert (h, n) == (head, len(f))
    got = mem.read(BUF, n)
    assert struct.unpack_from("<H", got, 10)[0] == 1 and got[HDR_LEN:] == f[HDR_LEN:]
    assert net.stats.rx_packets == 1


def test_receive_waits_for_buffers_without_spinning(mem, datapath):
    watch = []
    net, dev, drv, (rx, tx, ctrl), tap = start(mem, watch=watch)
    tap.host().send(frame(payload=b"first"))
    net.tap_readable(0)             # no buffers: the frame is held, the fd no longer watched
    assert watch[-1] == (0, False) and rx.used() == []
    rx.add([(BUF, 4096, True)])
    drv.notify(0)                   # the guest's rx kick delivers it and watches again
    assert len(rx.used()) == 1 and watch[-1] == (0, True)
    assert mem.read(BUF + HDR_LEN + 14, 5) == b"first"


def test_mergeable_buffers_span_chains(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    assert net.driver_features & F_MRG_RXBUF
    heads = [rx.add([(BUF + 0x1000 * i, 1000, True)]) for i in range(4)]
    f = frame(payload=bytes(range(256)) * 10)     # 2586 bytes: three buffers
    tap.host().send(f)
    net.tap_readable(0)
    used = rx.used()
    assert [h for h, _ in used] == heads[:3] and [n for _, n in used] == [1000, 1000, len(f) - 2000]
    got = b"".join(mem.read(BUF + 0x1000 * i, n) for i, (_, n) in enumerate(used))
    assert struct.unpack_from("<H", got, 10)[0] == 3 and got[HDR_LEN:] == f[HDR_LEN:]


def test_mergeable_not_enough_buffers_rewinds(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    rx.add([(BUF, 1000, True)])
    tap.host().send(frame(payload=b"y" * 3000))
    net.tap_readable(0)
    assert rx.used() == []              # nothing consumed
    rx.add([(BUF + 0x1000, 4000, True)])
    drv.notify(0)
    assert [n for _, n in rx.used()] == [1000, len(frame(payload=b"y" * 3000)) - 1000]


def test_small_buffers_without_mergeable_drop_the_frame(mem, datapath):
    net, dev, drv, (rx, tx), tap = start(mem, VIRTIO_F_VERSION_1 | F_MAC)
    h1 = rx.add([(BUF, 40, True)])
    h2 = rx.add([(BUF + 0x1000, 4, True)])   # shorter than a header
    tap.host().send(frame())
    net.tap_readable(0)
    assert rx.used() == [(h1, 0)] and net.stats.rx_dropped == 1
    tap.host().send(frame())
    net.tap_readable(0)                 # the short one is skipped, nothing else to use: rewound
    assert rx.used() == [] and net.stats.bad_buffers == 1 and not dev.broken
    h3 = rx.add([(BUF + 0x2000, 2048, True)])
    drv.notify(0)
    assert rx.used() == [(h3, len(frame())), (h2, 0)]


def test_receive_filter_and_control_queue(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    acks = []

    def command(cls, cmd, payload):
        mem.write(0x60000, bytes([cls, cmd]) + payload)
        ctrl.add([(0x60000, 2 + len(payload), False), (0x61000, 1, True)])
        drv.notify(2)
        ((_, n),) = ctrl.used()
        acks.append(mem.read(0x61000, 1)[0])

    assert net.rx_filter.promisc
    command(netctrl.CTRL_RX, netctrl.RX_PROMISC, b"\x00")
    table = struct.pack("<I", 1) + OTHER + struct.pack("<I", 1) + b"\x33\x33\x00\x00\x00\x01"
    command(netctrl.CTRL_MAC, netctrl.MAC_TABLE_SET, table)
    command(netctrl.CTRL_MAC, netctrl.MAC_TABLE_SET, struct.pack("<I", 5) + OTHER)   # lies about its size
    command(9, 0, b"")
    assert acks == [0, 0, 1, 1]
    for i in range(6):
        rx.add([(BUF + 0x1000 * i, 2048, True)])
    for dest in (MAC, OTHER, b"\x02" * 6, b"\xff" * 6, b"\x33\x33\x00\x00\x00\x01", b"\x01\x00\x5e\x00\x00\x09"):
        tap.host().send(frame(dest=dest))
    net.tap_readable(0)
    assert len(rx.used()) == 4 and net.stats.rx_filtered == 2
    command(netctrl.CTRL_MAC, netctrl.MAC_ADDR_SET, OTHER)
    assert acks[-1] == 0 and bytes(drv.config(i, 1) for i in range(6)) == OTHER


def test_guest_offloads_set_mirrors_onto_tap(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    mem.write(0x60000, bytes([netctrl.CTRL_GUEST_OFFLOADS, 0]) + struct.pack("<Q", F_GUEST_CSUM))
    ctrl.add([(0x60000, 10, False), (0x61000, 1, True)])
    drv.notify(2)
    assert mem.read(0x61000, 1) == b"\x00" and tap.offloads[-1] == F_GUEST_CSUM
    dev.reset()
    assert tap.offloads[-1] == 0


def test_link_down_up_and_announce(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    gen = drv.read(1, 0x15, 1)
    net.set_link(False)
    assert drv.config(6, 2) & 1 == 0 and drv.read(1, 0x15, 1) != gen
    mem.write(BUF, frame())
    tx.add([(BUF, len(frame()), False)])
    drv.notify(1)
    assert net.stats.tx_dropped == 1
    net.set_link(True)
    net.announce()
    assert drv.config(6, 2) == 3
    mem.write(0x60000, bytes([netctrl.CTRL_ANNOUNCE, 0]))
    ctrl.add([(0x60000, 2, False), (0x61000, 1, True)])
    drv.notify(2)
    assert drv.config(6, 2) == 1


def test_hostile_ring_breaks_device_not_vmm(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    rx.add([(0x7FFF_0000_0000, 2048, True)])
    tap.host().send(frame())
    dev.handle_notify(0)
    assert dev.broken


def test_state_round_trip_and_validation(mem, datapath):
    net, dev, drv, (rx, tx, ctrl), tap = start(mem)
    net.rx_filter.set_mode(netctrl.RX_PROMISC, False)
    net.set_link(False)
    s = net.state()
    other = VirtioNet(FakeTap(), MAC)
    other.restore(s)
    assert other.state() == s and not other.link_up and not other.rx_filter.promisc
    for bad in (dict(mac=b"\x00"), dict(queue_pairs=2), dict(guest_offloads=1 << 40), dict(link_up=1),
                dict(rx_filter=netctrl.RxFilter(uni_macs=[b"x"] * 65))):
        broken = netctrl.NetState(**{**s.__dict__, **bad})
        with pytest.raises(StateError):
            other.restore(broken)
    with pytest.raises(StateError):
        other.restore(object())
    tap.close()


def test_multiqueue_pairs_and_control_index(mem, datapath):
    net, dev, drv, qs, tap = start(mem, pairs=2)
    rx0, tx0, rx1, tx1, ctrl = qs
    assert net.driver_features & netctrl.F_MQ and net.ctrl_index == 4 and drv.config(8, 2) == 2
    mem.write(0x60000, bytes([netctrl.CTRL_MQ, netctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2))
    ctrl.add([(0x60000, 4, False), (0x61000, 1, True)])
    drv.notify(4)
    assert mem.read(0x61000, 1) == b"\x00" and net.queue_pairs == 2
    mem.write(BUF, frame(payload=b"pair1"))
    tx1.add([(BUF, len(frame(payload=b"pair1")), False)])
    drv.notify(3)
    assert tap.host(1).recv(4096)[HDR_LEN + 14:HDR_LEN + 19] == b"pair1"
    h = rx1.add([(BUF + 0x1000, 2048, True)])
    tap.host(1).send(frame(payload=b"back1"))
    net.on_tap_readable(1)
    assert rx1.used() == [(h, len(frame(payload=b"back1")))] and rx0.used() == []
    mem.write(0x60000, bytes([netctrl.CTRL_MQ, netctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 3))
    ctrl.add([(0x60000, 4, False), (0x61000, 1, True)])
    drv.notify(4)
    assert mem.read(0x61000, 1) == b"\x01" and net.queue_pairs == 2   # more pairs than offered
    mem.write(0x60000, bytes([netctrl.CTRL_MQ, netctrl.MQ_VQ_PAIRS_SET]) + struct.pack("<H", 1))
    ctrl.add([(0x60000, 4, False), (0x61000, 1, True)])
    drv.notify(4)
    h = rx0.add([(BUF + 0x2000, 2048, True)])
    tap.host(1).send(frame(payload=b"moved"))   # the kernel still steers to queue 1: ring 0 takes it
    net.on_tap_readable(1)
    assert rx0.used() == [(h, len(frame(payload=b"moved")))]


def test_a_burst_begun_by_an_rx_kick_watches_the_tap_again(mem, datapath):
    """Frames wait behind an empty ring (the TAP is not watched); the guest's rx kick delivers a
    burst and the TAP still has frames: it must be watched again, or they wait for a kick that a
    guest with buffers to spare never sends (Linux refills only when half its ring is free)."""
    from kvmpy.devices.virtio.net import RX_BURST
    watch = []
    net, dev, drv, (rx, tx, ctrl), tap = start(mem, watch=watch)
    for i in range(RX_BURST + 5):
        tap.host().send(frame(payload=bytes([i]) * 10))
    net.tap_readable(0)
    assert watch[-1] == (0, False) and rx.used() == []
    for i in range(RX_BURST + 20):
        rx.add([(BUF + 0x800 * i, 2048, True)])
    drv.notify(0)
    assert len(rx.used()) == RX_BURST and watch[-1] == (0, True)
    net.tap_readable(0)                 # the event loop's next call takes the rest
    assert len(rx.used()) == 5 and watch[-1] == (0, True)
