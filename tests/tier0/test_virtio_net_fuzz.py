"""Hostile guests and peers against virtio-net (property-based): random descriptor chains (inside
and outside RAM, too short for a header, oversize), random frames from the TAP, random control
commands. Nothing may escape: bad frames are counted and dropped, a broken ring only sets
DEVICE_NEEDS_RESET, and a TAP the device cannot serve is no longer watched."""
import socket

from hypothesis import HealthCheck, event, given, settings, strategies as st

from support.mock_driver import BumpAllocator, MockPciDriver
from kvmpy.devices.virtio.net import HDR_LEN, MAX_FRAME, VirtioNet
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.memslots import GuestMemory

RAM = 1 << 20
addresses = st.one_of(st.integers(0x70000, RAM - 1), st.integers(0, 2**64 - 1))
lengths = st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1))
descs = st.tuples(addresses, lengths, st.integers(0, 7), st.integers(0, 300))
sane = st.tuples(st.integers(0x70000, RAM - 0x2000), st.integers(0, 0x2000), st.sampled_from([0, 2]),
                 st.just(0))
chains = st.lists(st.one_of(st.lists(descs, min_size=1, max_size=4), st.lists(sane, min_size=1, max_size=1)),
                  max_size=6)
own_frame = st.integers(0, MAX_FRAME + HDR_LEN).map(
    lambda n: bytes(HDR_LEN) + b"\x52\x54\x00\x12\x34\x56" + bytes(max(0, n - HDR_LEN - 6)))
frames = st.lists(st.one_of(st.binary(max_size=HDR_LEN + 20), own_frame), max_size=4)


class Tap:
    def __init__(self):
        self.a, self.b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.a.setblocking(False)
        self.b.setblocking(False)
        self.b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        self.a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.fds = [self.a.fileno()]

    def set_guest_offloads(self, offloads):
        pass


def fill_queue(mem, q, chain_list):
    """Write raw descriptors (whatever the strategy gave: any flags, any next index, any
    address) and publish their heads."""
    for i, chain in enumerate(chain_list):
        base = (i * 4) % q.size
        for j, (addr, length, flags, nxt) in enumerate(chain):
            q.write_desc((base + j) % q.size, addr, length, flags, nxt)
        q.publish(base)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rx_chains=chains, tx_chains=chains, ctrl_chains=chains, tap_frames=frames,
       mergeable=st.booleans(), ctrl_bytes=st.binary(max_size=64), order=st.permutations([0, 1, 2]))
def test_hostile_rings_never_escape(rx_chains, tx_chains, ctrl_chains, tap_frames, mergeable, ctrl_bytes, order):
    mem = GuestMemory.create(RAM)
    tap = Tap()
    try:
        net = VirtioNet(tap, b"\x52\x54\x00\x12\x34\x56")
        watched = {}
        net.watch_fd = lambda fd, cb: watched.__setitem__(tap.fds.index(fd), cb is not None)
        dev = VirtioPciDevice(net, mem)
        drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x70000))
        features = drv.device_features() & ~(0 if mergeable else 1 << 15)
        rx, tx, ctrl = drv.start(3, features)
        mem.write(0x70000, ctrl_bytes)
        for data in tap_frames:
            try:
                tap.b.send(data)
            except OSError:
                pass
        fill_queue(mem, rx, rx_chains)
        fill_queue(mem, tx, tx_chains)
        fill_queue(mem, ctrl, ctrl_chains)
        for index in order:
            dev.handle_notify(index)
        net.on_tap_readable(0)
        if dev.broken:
            net.on_tap_readable(0)
            assert watched.get(0) is False    # a broken device stops reading the TAP
        s = net.stats
        event(f"broken={dev.broken} rx={s.rx_packets > 0} tx={s.tx_packets > 0} dropped={s.tx_dropped > 0}")
        assert min(s.rx_packets, s.rx_dropped, s.tx_packets, s.tx_dropped, s.ctrl_errors) >= 0
        dev.reset()
        assert watched.get(0) is False
    finally:
        mem.close()
        tap.a.close()
        tap.b.close()

