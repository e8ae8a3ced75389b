"""Tier 0: virtio-net's rings as Linux's virtio_ring sees them (issue 12's "output.0:id 0 is not
a head!"), on both data paths.

The driver here keeps Linux's bookkeeping: a LIFO free list (so head 0 is reused over and over,
as in an idle guest's tx ring), one outstanding entry per head, and on every used entry Linux's
checks: the id is in range and is a head the device holds, the length fits the chain; the used
index never runs more than a ring ahead. Random interleavings of tx and rx posts, kicks, frames
from the host, the TAP's readability, timers (a tx burst's rest), link down/up, a state round
trip (pause/save/restore) and driver resets are played; tx frames must reach the host, and rx
frames the guest, each at most once and in order. A second test does the same with the device's
three callers (tx kicks, TAP readability, timers) on threads of their own while the driver posts
and reaps, as the event loop, the vCPUs and the guest overlap in L1: the checks count, never the
clock.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hypothesis_budget import examples
from kvmpy.devices.virtio import fastpath, netctrl
from kvmpy.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX
from kvmpy.devices.virtio.net import HDR_LEN, VirtioNet
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.memslots import GuestMemory
from support.mock_driver import BumpAllocator, MockPciDriver, MockQueue

RAM = 2 << 20
RINGS, RINGS_END = 0x10000, 0x40000
INDIRECT = 0x40000           # + head * 0x100: each in-flight indirect chain's table
TXBUF = 0x50000              # + head * 0x1000
RXBUF = 0x100000             # + head * 0x1000
QSIZE = 64
MAC = bytes.fromhex("525400123456")
PEER = bytes.fromhex("525400abcdef")
SEQ = struct.Struct("<I")


class StrictRing:
    """Linux's split-ring bookkeeping over one MockQueue (virtqueue_add_split/detach_buf_split/
    virtqueue_get_buf_ctx_split): desc_state per head, freed descriptors pushed on the front of
    the free list, and BAD_RING's checks as assertions."""

    def __init__(self, q: MockQueue, name: str):
        self.q, self.name = q, name
        self.outstanding: dict[int, int] = {}   # head -> the chain's writable length
        self.completions = 0

    def add(self, segments: list[tuple[int, int, bool]], indirect: bool = False) -> int | None:
        q = self.q
        if not q.free or (not indirect and len(segments) > len(q.free)):
            return None
        head = q.free[0]
        q.add(segments, indirect_at=INDIRECT + head * 0x100 if indirect else None)
        self.outstanding[head] = sum(n for _, n, w in segments if w)
        return head

    def reap(self) -> list[tuple[int, int]]:
        q = self.q
        idx = q.mem.read_u16(q.used_addr + 2)
        ahead = (idx - q.last_used) & 0xFFFF
        assert ahead <= q.size, f"{self.name}: used index ran {ahead} entries ahead (size {q.size})"
        out = []
        while q.last_used != idx:
            off = q.used_addr + 4 + 8 * (q.last_used % q.size)
            head, length = q.mem.read_u32(off), q.mem.read_u32(off + 4)
            assert head < q.size, f"{self.name}: id {head} out of range"
            assert head in self.outstanding, f"{self.name}: id {head} is not a head!"
            assert length <= self.outstanding.pop(head), f"{self.name}: id {head} written past its buffers"
            q.free[:0] = q._chains.pop(head)
            q.last_used = (q.last_used + 1) & 0xFFFF
            self.completions += 1
            out.append((head, length))
        return out


class Tap:
    def __init__(self) -> None:
        self.dev_end, self.host = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.dev_end, self.host):
            s.setblocking(False)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.fds = [self.dev_end.fileno()]

    def set_guest_offloads(self, offloads: int) -> None:
        pass

    def close(self) -> None:
        self.dev_end.close()
        self.host.close()


def frame(seq: int, length: int, dest: bytes = MAC) -> bytes:
    body = SEQ.pack(seq) + bytes((seq + i) & 0xFF for i in range(max(0, length - 4)))
    return bytes(HDR_LEN) + dest + PEER + b"\x08\x00" + body


def seq_of(data: bytes) -> int:
    return SEQ.unpack_from(data, HDR_LEN + 14)[0]


class World:
    """One device, its driver and its TAP; `ops` are played on it one by one."""

    def __init__(self, fast: bool, features_mask: int):
        self.mem = GuestMemory.create(RAM)
        self.tap = Tap()
        self.timers: list = []
        saved = fastpath.ENABLED
        fastpath.ENABLED = fast
        try:
            self.net = VirtioNet(self.tap, MAC, call_later=lambda delay, fn, *a: self.timers.append((fn, a)))
            self.dev = VirtioPciDevice(self.net, self.mem)
        finally:
            fastpath.ENABLED = saved
        self.net.watch_fd = lambda fd, cb: None
        self.drv = MockPciDriver(self.dev, self.mem, BumpAllocator(RINGS, RINGS_END))
        self.features_mask = features_mask
        self.tx_seq = self.host_seq = 0
        self.host_got: list[int] = []
        self.guest_got: list[int] = []
        self.setup()

    def setup(self) -> None:
        """Linux's probe: reset, features, rings, DRIVER_OK (again after a driver reset)."""
        drv = self.drv
        if drv.alloc.next + 3 * 0x1000 > RINGS_END:
            drv.alloc.next = RINGS          # old rings are dead after a reset: reuse their space
        assert drv.negotiate(drv.device_features() & ~self.features_mask)
        self.rx, self.tx = (StrictRing(drv.setup_queue(i, size=QSIZE), n) for i, n in ((0, "input.0"), (1, "output.0")))
        drv.driver_ok()

    # -- the guest ---------------------------------------------------------------------------------
    def post_tx(self, count: int, length: int, indirect: bool, split: bool) -> None:
        for _ in range(count):
            head = self.tx.q.free[0] if self.tx.q.free else None
            if head is None:
                return
            data = frame(self.tx_seq, length, PEER)
            buf = TXBUF + head * 0x1000
            self.mem.write(buf, data)
            segs = [(buf, HDR_LEN, False), (buf + HDR_LEN, len(data) - HDR_LEN, False)] if split else \
                [(buf, len(data), False)]
            if self.tx.add(segs, indirect) is None:
                return
            self.tx_seq += 1

    def post_rx(self, count: int, size: int) -> None:
        for _ in range(count):
            if not self.rx.q.free:
                return
            self.rx.add([(RXBUF + self.rx.q.free[0] * 0x1000, size, True)])

    def reap(self) -> None:
        self.tx.reap()
        # rx entries hold whole frames (every frame here fits one buffer) or drops (length 0)
        for head, length in self.rx.reap():
            if length >= HDR_LEN + 18:
                self.guest_got.append(seq_of(self.mem.read(RXBUF + head * 0x1000, length)))

    # -- the host ----------------------------------------------------------------------------------
    def host_send(self, count: int, length: int) -> None:
        for _ in range(count):
            try:
                self.tap.host.send(frame(self.host_seq, length))   # a TAP's frames carry the vnet header
            except BlockingIOError:
                return
            self.host_seq += 1

    def host_drain(self) -> None:
        while True:
            try:
                self.host_got.append(seq_of(self.tap.host.recv(1 << 17)))
            except BlockingIOError:
                return

    def run_timers(self) -> None:
        timers, self.timers = self.timers, []
        for fn, args in timers:
            fn(*args)

    def apply(self, op: tuple) -> None:
        kind = op[0]
        if kind == "tx":
            self.post_tx(*op[1:])
        elif kind == "rx":
            self.post_rx(*op[1:])
        elif kind == "kick":
            self.dev.handle_notify(op[1])
        elif kind == "host":
            self.host_send(*op[1:])
        elif kind == "readable":
            self.net.on_tap_readable(0)
        elif kind == "timers":
            self.run_timers()
        elif kind == "link":
            self.net.set_link(op[1])
        elif kind == "snapshot":            # pause, save, restore onto the same device
            self.dev.restore(self.dev.state())
        elif kind == "reset":               # the driver resets: it owns every buffer again
            self.reap()
            self.drv.set_status(0)
            self.setup()
        elif kind == "reap":
            self.reap()
        self.host_drain()

    def check(self) -> None:
        assert not self.dev.broken, "a well-behaved driver broke the device"
        assert self.net.stats.ring_errors == 0, "the ring watch saw indices move behind the device"
        for ring, q in zip((self.rx, self.tx), self.dev.queues):
            assert self.mem.read_u16(ring.q.used_addr + 2) == q.used_idx, f"{ring.name}: two used indices"
        txq = self.dev.queues[1]
        assert txq.last_avail_idx == txq.used_idx, "tx: a chain popped and never returned"
        for got, what in ((self.host_got, "host"), (self.guest_got, "guest")):
            assert all(a < b for a, b in zip(got, got[1:])), f"the {what} got a frame twice or out of order: {got}"

    def close(self) -> None:
        self.net.close()
        self.tap.close()
        self.mem.close()


op_st = st.one_of(
    st.tuples(st.just("tx"), st.integers(1, 70), st.sampled_from([60, 200, 1400]), st.booleans(), st.booleans()),
    st.tuples(st.just("rx"), st.integers(1, 70), st.sampled_from([1526, 2048])),
    st.tuples(st.just("kick"), st.sampled_from([0, 1, 1])),
    st.tuples(st.just("host"), st.integers(1, 80), st.sampled_from([60, 1000, 1480])),
    st.tuples(st.just("readable")), st.tuples(st.just("timers")),
    st.tuples(st.just("link"), st.booleans()),
    st.tuples(st.just("snapshot")), st.tuples(st.just("reset")),
    st.tuples(st.just("reap")), st.tuples(st.just("reap")),
)
MASKS = [0, netctrl.F_MRG_RXBUF, VIRTIO_F_RING_EVENT_IDX, netctrl.F_MRG_RXBUF | VIRTIO_F_RING_EVENT_IDX]


@pytest.mark.parametrize("fast", [False, True], ids=["python", "c"])
@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op_st, min_size=1, max_size=40), features_mask=st.sampled_from(MASKS))
def test_every_used_entry_is_a_head_the_device_holds(fast, ops, features_mask):
    if fast and not fastpath.AVAILABLE:
        pytest.fail("kvmpy.ioctl._kvm lacks the C virtio data path: rebuild it (make venv)")
    w = World(fast, features_mask)
    try:
        for op in ops:
            w.apply(op)
            w.reap()
        for _ in range(3):      # what waits (a burst's rest, frames behind a full ring) gets its turn
            w.apply(("timers",))
            w.apply(("readable",))
            w.apply(("kick", 1))
            w.reap()
        w.check()
    finally:
        w.close()


def record_breaks(w: World) -> list[str]:
    """Why the device broke, with both rings' indices as they were at that moment (under the
    device's lock): what the driver wrote, what RAM holds, what the device had. For the open
    defect below: tells a bad index in RAM from a bad one in the device."""
    breaks: list[str] = []
    mark_broken = w.dev.mark_broken

    def record(reason: str) -> None:
        rings = "; ".join(f"{r.name}: driver wrote avail {r.q.avail_idx}, RAM avail {w.mem.read_u16(r.q.avail_addr + 2)}"
                          f" used {w.mem.read_u16(r.q.used_addr + 2)}, device last_avail {q.last_avail_idx} used {q.used_idx}"
                          for r, q in zip((w.rx, w.tx), w.dev.queues))
        breaks.append(f"{reason} ({rings})")
        mark_broken(reason)
    w.dev.mark_broken = record
    return breaks


# Where this test was written, about one run in four under load once broke the C path's device
# with "queue 1: avail index jumped 46768 entries ahead (size 64)"; not seen since in ~220 runs
# (alone, loaded, pinned to one CPU, whole tiers), so it runs unmarked: should it come back, it
# fails, and record_breaks() names both rings' indices (driver-written, in RAM, the device's).
@pytest.mark.parametrize("fast", [False, True], ids=["python", "c"])
def test_tx_kicks_and_rx_on_other_threads_keep_the_rings_whole(fast):
    """The device's callers on three threads (tx kicks, the TAP's readability, timers), the driver
    posting and reaping on a fourth, the host on a fifth; a fixed amount of traffic each way."""
    if fast and not fastpath.AVAILABLE:
        pytest.fail("kvmpy.ioctl._kvm lacks the C virtio data path: rebuild it (make venv)")
    w = World(fast, 0)
    frames = 3000
    done = threading.Event()
    errors: list[BaseException] = []
    guest_lock = threading.Lock()       # the driver's own state (free lists), as Linux's tx lock
    breaks = record_breaks(w)

    def guard(fn):
        def run() -> None:
            try:
                fn()
            except BaseException as e:   # reported by the test thread
                errors.append(e)
                done.set()
        return run

    def device_loop(call) -> None:
        while not done.is_set():
            call()

    def timers() -> None:
        while not done.is_set():
            w.run_timers()

    def guest() -> None:
        while not done.is_set() and (w.tx.completions < frames or len(w.guest_got) < frames // 2):
            if w.dev.broken:
                raise AssertionError(f"a well-behaved driver broke the device: {breaks}")
            with guest_lock:
                # never more than `frames`: a guest that went on sending while it waited for its rx
                # frames flooded the host's thread with tx to drain, and rx starved (a tier-0 run
                # with a big heap took over ten minutes here instead of five seconds)
                if w.tx_seq < frames:
                    w.post_tx(4, 200, w.tx_seq % 3 == 0, w.tx_seq % 2 == 0)
                w.post_rx(8, 2048)
                w.reap()
        done.set()

    def host() -> None:
        while not done.is_set():
            if w.host_seq < frames:
                w.host_send(8, 1000)
            w.host_drain()

    threads = [threading.Thread(target=guard(f), daemon=True) for f in (
        lambda: device_loop(lambda: w.dev.handle_notify(1)), lambda: device_loop(lambda: w.net.on_tap_readable(0)),
        timers, guest, host)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300      # a hang guard only: the work is counted, not timed
        for t in threads:
            t.join(timeout=max(deadline - time.monotonic(), 0))
        assert not any(t.is_alive() for t in threads), (
            f"a thread hung: tx {w.tx_seq} posted, {w.tx.completions} completed, {len(w.host_got)} at the host; "
            f"rx {w.host_seq} sent, {len(w.guest_got)} at the guest")
        assert not errors, errors[0]
        assert not breaks, breaks
        w.host_drain()
        w.check()
        assert w.tx.completions >= frames and len(w.host_got) == w.net.stats.tx_packets > 0
    finally:
        done.set()
        w.close()


@pytest.mark.parametrize("fast", [False, True], ids=["python", "c"])
@pytest.mark.parametrize("fault", ["stale-index", "used-in-ram"])
def test_the_ring_watch_reports_indices_moved_behind_the_device(fast, fault, caplog):
    """The detection kept for the defect: a stale copy of last_avail_idx written back between two
    tx passes (which makes Linux see "id 0 is not a head!"), or a used index in guest RAM that
    is not the device's, is counted and logged once with the ring's state; the device carries on."""
    w = World(fast, 0)
    try:
        w.apply(("tx", 1, 200, False, False))
        w.apply(("kick", 1))
        w.reap()
        txq = w.dev.queues[1]
        if fault == "stale-index":
            txq.last_avail_idx = (txq.last_avail_idx - 1) & 0xFFFF
        else:
            w.mem.write(w.tx.q.used_addr + 2, struct.pack("<H", txq.used_idx + 5))
        with caplog.at_level("WARNING", logger="kvmpy"):
            w.apply(("tx", 1, 200, False, False))
            w.apply(("kick", 1))
        assert w.net.stats.ring_errors >= 1
        lines = [r.getMessage() for r in caplog.records if "virtio-net: queue 1:" in r.getMessage()]
        assert lines and "avail idx in RAM 2" in lines[0], lines
        assert not w.dev.broken
    finally:
        w.close()



@pytest.mark.parametrize("fast", [False, True], ids=["python", "c"])
def test_a_waiting_rx_frame_survives_tx_passes_on_the_shared_record(fast):
    """One record per queue pair (the C path's struct kvmpy_net, the Python path's _pending) holds
    a frame that found no rx buffer while tx passes run on the same pair: interleaved by hand, the
    frame reaches the guest whole, first and once, and every tx frame the host."""
    if fast and not fastpath.AVAILABLE:
        pytest.fail("kvmpy.ioctl._kvm lacks the C virtio data path: rebuild it (make venv)")
    w = World(fast, netctrl.F_MRG_RXBUF)
    try:
        w.host_send(3, 1480)
        w.apply(("readable",))              # no rx buffers: frame 0 waits in the pair's record
        assert w.net.stats.rx_packets == 0
        for _ in range(5):                  # tx passes on the same pair's record, readability too
            w.apply(("tx", 7, 1400, False, True))
            w.apply(("kick", 1))
            w.apply(("readable",))
            w.tx.reap()
        w.apply(("rx", 8, 2048))
        w.apply(("kick", 0))
        w.apply(("readable",))
        got = [w.mem.read(RXBUF + head * 0x1000, length) for head, length in w.rx.reap()]
        assert [g[HDR_LEN:] for g in got] == [frame(seq, 1480)[HDR_LEN:] for seq in range(3)]
        assert w.host_got == list(range(35)) and w.net.stats.rx_packets == 3
        w.check()
    finally:
        w.close()
