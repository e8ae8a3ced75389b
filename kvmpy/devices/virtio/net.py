"""virtio-net (device type 1, virtio 1.2 section 5.1) over a TAP-like backend, in userspace.

The backend is a file descriptor per queue pair that reads and writes whole Ethernet frames,
each preceded by the 12-byte virtio_net_hdr_v1 (a TAP opened with IFF_VNET_HDR and
TUNSETVNETHDRSZ 12; a SOCK_SEQPACKET socketpair in tier 0). Because the TAP speaks the same
header, offloads pass straight through: the guest's checksum/TSO/UFO requests go to the TAP as
written (checked against what was negotiated), and what the guest can receive is mirrored onto
the TAP (`set_guest_offloads`, TUNSETOFFLOAD) so the host only sends it frames it understands.

Receiving is driven by the TAP's readability: the composer watches the fd only while the guest
has posted buffers (`watch_fd`), so a guest that stops posting cannot make the event loop spin;
a frame that found no room waits (one per queue pair) for the guest's next rx kick.

With an offload (vhost-net) attached, the rx/tx rings belong to the kernel between DRIVER_OK
and reset; only the control queue stays here.
"""
from __future__ import annotations

import functools
import logging
import os
import struct
from typing import Any, Callable, ClassVar

from kvmpy.devices.virtio import netctrl, netpath
from kvmpy.devices.virtio.netctrl import NetBackend, NetOffload, NetStats
from kvmpy.devices.virtio.netctrl import (F_CTRL_GUEST_OFFLOADS, F_CTRL_MAC_ADDR, F_CTRL_RX,
                                          F_CTRL_VQ, F_GUEST_ANNOUNCE, F_MAC, F_MQ, F_MRG_RXBUF, F_MTU,
                                          F_STATUS, GUEST_OFFLOADS, HOST_OFFLOADS)
from kvmpy.devices.virtio.device import VIRTIO_ID_NET, VirtioDevice
from kvmpy.devices.virtio.netring import RingWatch
from kvmpy.devices.virtio.netpath import GSO_TCPV4, HDR_LEN, MAX_FRAME, CNet  # noqa: F401 (GSO_TCPV4: re-export)
from kvmpy.devices.virtio.queue import DescChain, Virtqueue
from kvmpy.errors import KvmpyError
from kvmpy.memslots import GuestMemory
from kvmpy.ratelimit import RateLimitedLog

log = logging.getLogger(__name__)

S_LINK_UP, S_ANNOUNCE = 1, 2

RX_BURST, TX_BURST = 64, 256       # frames per pass before yielding the event loop
_HDR = struct.Struct("<BBHHHHH")


class VirtioNet(VirtioDevice):
    DEVICE_KIND: ClassVar[str] = "virtio-net"
    device_type = VIRTIO_ID_NET
    name = "net"
    pci_class = 0x020000
    queue_max_size = 256

    def __init__(self, backend: NetBackend, mac: bytes, queue_pairs: int = 1, mtu: int = 1500,
                 call_later: Callable[..., Any] | None = None, offload: NetOffload | None = None):
        super().__init__()
        if len(mac) != 6 or mac[0] & 1 or not 1 <= queue_pairs <= 0x8000 or len(backend.fds) < queue_pairs:
            raise KvmpyError("creating virtio-net", detail="bad MAC, queue pair count or backend fds")
        self.backend, self.mac, self.max_pairs, self.mtu = backend, bytes(mac), queue_pairs, mtu
        self.num_queues = 2 * queue_pairs + 1   # rx/tx pairs, then the control queue
        self.call_later, self.offload = call_later, offload
        self.close_backend = True       # False: the TAP outlives this device (the machine keeps it)
        # set by the composer: watch_fd(fd, callback) has the event loop call back while fd is
        # readable; watch_fd(fd, None) stops that
        self.watch_fd: Callable[[int, Callable[[], None] | None], None] | None = None
        self.stats = NetStats()
        self.link_up = True
        self._ratelog = RateLimitedLog(log)
        self._rings = RingWatch(self.stats, self._ratelog)   # issue 12's "id 0 is not a head!"
        self._watching = [False] * queue_pairs
        self._pending: list[bytearray | None] = [None] * queue_pairs
        self._rxbuf = bytearray(HDR_LEN + MAX_FRAME)
        self._cnets: list[CNet | None] = [None] * queue_pairs   # the C data path's, per pair
        self._offloaded = False
        self._ran = False        # did the last on_tap_readable reach tap_readable?
        self._restored = False   # restore() set guest_offloads: activate() keeps them
        self._reset_driver_state()

    def _reset_driver_state(self) -> None:
        self.rx_filter = netctrl.RxFilter()
        self.queue_pairs = 1
        self.guest_offloads = 0
        self.announce_pending = False

    # -- features and config -------------------------------------------------------------------
    def device_features(self) -> int:
        f = (HOST_OFFLOADS | GUEST_OFFLOADS | F_CTRL_GUEST_OFFLOADS | F_MTU | F_MAC | F_MRG_RXBUF
             | F_STATUS | F_CTRL_VQ | F_CTRL_RX | F_GUEST_ANNOUNCE | F_CTRL_MAC_ADDR)
        return f | (F_MQ if self.max_pairs > 1 else 0)

    def config_bytes(self) -> bytes:
        status = (S_LINK_UP if self.link_up else 0) | (S_ANNOUNCE if self.announce_pending else 0)
        return self.mac + struct.pack("<HHH", status, self.max_pairs, self.mtu)

    def _has(self, feature: int) -> bool:
        return bool(self.driver_features & feature)

    @property
    def ctrl_index(self) -> int:
        return 2 * self.max_pairs if self._has(F_MQ) else 2

    # -- life cycle ----------------------------------------------------------------------------
    def activate(self, mem: GuestMemory, queues: list[Virtqueue], interrupt: Callable[[Virtqueue], None],
                 driver_features: int) -> None:
        super().activate(mem, queues, interrupt, driver_features)
        restored, self._restored = self._restored, False
        self._rings.forget()
        self.set_guest_offloads(self.guest_offloads if restored else driver_features & GUEST_OFFLOADS)
        if restored and self.offload is not None:
            # to the kernel when the machine runs (resume()), as QEMU starts vhost: started in the
            # board's restore, vhost signals the irqfd before the LAPICs are loaded, KVM_SET_LAPIC
            # wipes that interrupt and, with event idx, the guest's rx waits for ever (issue 12)
            return
        self._start_data_path()

    def reset(self) -> None:
        self.quiesce()
        for pair in range(self.max_pairs):
            self._watch(pair, False)
        self._pending = [None] * self.max_pairs
        for cnet in self._cnets:
            if cnet is not None:
                cnet.drop_pending()
        self._reset_driver_state()
        self._rings.forget()
        if self.active:
            self.set_guest_offloads(0)
        super().reset()

    def quiesce(self) -> None:
        """Take the rings back from the kernel (their indices land in the Virtqueues): before
        state is read, on pause and on reset. `resume()` hands them over again."""
        if self._offloaded and self.offload is not None:
            self.offload.stop()
            self._offloaded = False
            self._rings.forget()      # the kernel moved the indices

    def resume(self) -> None:
        """The machine runs (again): hand the rings to the kernel (after a pause, or for the
        first time after a restore); when it refuses, carry on in userspace."""
        if self.active and not self._offloaded and self.offload is not None:
            self._start_data_path()

    def _start_data_path(self) -> None:
        """vhost-net when there is an offload and it starts, else the TAPs watched here."""
        if self.offload is not None:
            try:
                self.offload.start(self.queues, self.driver_features, self.max_pairs)
                self._offloaded = True
                return
            except KvmpyError as e:
                log.warning("virtio-net: vhost offload failed (%s); carrying on in userspace", e)
        for pair in range(self.max_pairs):
            self._watch(pair, True)

    def close(self) -> None:
        self.quiesce()
        for pair in range(self.max_pairs):
            self._watch(pair, False)
        for owner in (self.offload, self.backend if self.close_backend else None):
            close = getattr(owner, "close", None)
            if close is not None:
                close()

    def _watch(self, pair: int, on: bool) -> None:
        if self._watching[pair] != on and self.watch_fd is not None:
            self.watch_fd(self.backend.fds[pair], functools.partial(self.on_tap_readable, pair) if on else None)
        self._watching[pair] = on

    def set_guest_offloads(self, offloads: int) -> None:
        self.guest_offloads = offloads
        try:
            self.backend.set_guest_offloads(offloads)
        except KvmpyError as e:
            self._ratelog.warning("offload", "virtio-net: %s", e)

    # -- link state and announce (host side) -----------------------------------------------------
    def set_link(self, up: bool) -> None:
        """QEMU's set_link: the guest sees the change (config interrupt); while down, nothing is
        sent or received."""
        with self.lock:
            if up == self.link_up:
                return
            self.link_up = up
            if self.active and self._has(F_STATUS) and self.config_changed is not None:
                self.config_changed()
            if up and self.active and not self._offloaded:
                for pair in range(self.queue_pairs):
                    self._watch(pair, True)

    def announce(self) -> None:
        """Ask the guest to announce itself (gratuitous ARP), e.g. after migration."""
        with self.lock:
            if self.active and self._has(F_GUEST_ANNOUNCE) and self._has(F_CTRL_VQ):
                self.announce_pending = True
                if self.config_changed is not None:
                    self.config_changed()

    # -- queues --------------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == self.ctrl_index and self._has(F_CTRL_VQ):
            self._control()
            return
        pair, is_tx = divmod(index, 2)
        if pair >= self.max_pairs:
            return
        if self._offloaded and self.offload is not None:
            self.offload.kick(index)    # a notify that trapped instead of reaching vhost's eventfd
        elif is_tx:
            self._transmit(pair)
        else:
            self.tap_readable(pair)

    def on_tap_readable(self, pair: int) -> None:
        """The event loop's callback for the TAP fd of `pair`: goes through the transport (which
        turns a broken ring into DEVICE_NEEDS_RESET); when the transport would not run us (reset,
        broken), stop watching, or a level-triggered fd would spin the loop."""
        self._ran = False
        if self.kick is not None:
            self.kick(2 * pair)
        if not self._ran:
            self._watch(pair, False)

    def tap_readable(self, pair: int) -> None:
        """The TAP of `pair` has frames, or the guest posted rx buffers: deliver what fits."""
        self._ran = True
        # a TAP queue the guest has not enabled (VQ_PAIRS_SET) still gets frames: use an active ring
        rxq = 2 * (pair % self.queue_pairs) if self._has(F_MQ) else 2 * pair
        q = self.queues[rxq] if rxq < len(self.queues) else None
        if q is None or not q.ready or self._offloaded or not self.link_up:
            self._watch(pair, False)
            return
        try:
            self._receive(pair, q)
        except BaseException:
            self._watch(pair, False)   # the ring is broken: the transport marks us; stop reading
            raise

    def _cnet(self, pair: int, q: Virtqueue) -> CNet | None:
        """The C data path's record for `pair` when `q` walks in C, synced with the device."""
        if q.cring is None or not netpath.AVAILABLE:
            return None
        cnet = self._cnets[pair]
        if cnet is None:
            cnet = self._cnets[pair] = CNet(self.backend.fds[pair], self.queue_max_size)
        cnet.sync(self.mac, self.link_up, self.rx_filter, self.driver_features)
        return cnet

    def _receive(self, pair: int, q: Virtqueue) -> None:
        in_flight = self._rings.enter(q)
        self._receive_pass(pair, q)
        self._rings.leave(q, in_flight)

    def _receive_pass(self, pair: int, q: Virtqueue) -> None:
        mem = self.mem
        assert mem is not None
        if (cnet := self._cnet(pair, q)) is not None:
            rc, pushed = cnet.receive(q, RX_BURST, lambda dest: self.rx_filter.accepts(dest, self.mac),
                                      self.stats, self._ratelog.warning)
            self._watch(pair, rc != netpath.NOBUF)   # BURST: frames may remain, come back for them
            if pushed:
                self.signal_used(q)
            return
        pushed = False
        for _ in range(RX_BURST):
            frame = self._pending[pair]
            self._pending[pair] = None
            if frame is None:
                frame = self._read_frame(pair)
                if frame is None:
                    self._watch(pair, True)
                    break
                if not self.rx_filter.accepts(bytes(frame[HDR_LEN:HDR_LEN + 6]), self.mac):
                    self.stats.rx_filtered += 1
                    continue
            placed = netpath.place(q, mem, frame, self._has(F_MRG_RXBUF), self.stats)
            if placed is None:   # no buffers: keep the frame, wait for the guest's rx kick
                self._pending[pair] = frame
                self._watch(pair, False)
                break
            pushed = True        # delivered or dropped, chains went back
        else:   # the burst is spent and frames may remain: entered by an rx kick, we were not watching
            self._watch(pair, True)
        if pushed:
            self.signal_used(q)

    def _read_frame(self, pair: int) -> bytearray | None:
        while True:
            try:
                n = os.readv(self.backend.fds[pair], [self._rxbuf])
            except BlockingIOError:
                return None
            except OSError as e:
                self.stats.rx_dropped += 1
                self._ratelog.warning("tap-read", "virtio-net: reading the TAP failed: %s", e)
                return None
            if n == 0:
                return None
            if n < HDR_LEN + 14:
                self.stats.rx_dropped += 1
                continue
            return bytearray(memoryview(self._rxbuf)[:n])

    def _transmit(self, pair: int) -> None:
        q = self.queues[2 * pair + 1]
        mem = self.mem
        assert mem is not None
        in_flight = self._rings.enter(q)
        budget = TX_BURST if self.call_later is not None else 1 << 62
        pushed = False
        if (cnet := self._cnet(pair, q)) is not None:
            budget, pushed = cnet.transmit(q, budget, self.stats, self._ratelog.warning)
        while budget > 0 and cnet is None and (chain := q.pop()) is not None:
            self._send(pair, mem, chain)
            q.push(chain, 0)
            budget -= 1
            pushed = True
        self._rings.leave(q, in_flight)
        if pushed:
            self.signal_used(q)
        if budget <= 0 and q.has_pending() and self.call_later is not None and self.kick is not None:
            self.call_later(0, self.kick, 2 * pair + 1)

    def _send(self, pair: int, mem: GuestMemory, chain: DescChain) -> None:
        n = chain.readable_len
        if not self.link_up:
            self.stats.tx_dropped += 1
            return
        if not HDR_LEN + 14 <= n <= HDR_LEN + MAX_FRAME:
            self.stats.tx_dropped += 1
            self._ratelog.debug("tx-len", "virtio-net: dropped a %d-byte tx chain", n)
            return
        bufs = [mem.buffer(addr, length) for addr, length in chain.readable if length]
        head = bytearray()   # the header may be split over descriptors (any layout is allowed)
        for b in bufs:
            head += b[:HDR_LEN - len(head)]
            if len(head) == HDR_LEN:
                break
        flags, gso = head[0], head[1]
        if not netpath.tx_allowed(flags, gso, self._has):
            self.stats.tx_dropped += 1
            self._ratelog.debug("tx-hdr", "virtio-net: dropped a frame with unnegotiated offload %#x/%#x",
                                flags, gso)
            return
        try:
            os.writev(self.backend.fds[pair], bufs)
        except OSError as e:
            self.stats.tx_dropped += 1
            self._ratelog.warning("tap-write", "virtio-net: writing to the TAP failed: %s", e)
            return
        self.stats.tx_packets += 1
        self.stats.tx_bytes += n - HDR_LEN

    def _control(self) -> None:
        q = self.queues[self.ctrl_index]
        mem = self.mem
        assert mem is not None
        in_flight = self._rings.enter(q)
        pushed = False
        while (chain := q.pop()) is not None:
            pushed = True
            if not chain.writable or chain.readable_len > netctrl.MAX_CTRL_BYTES:
                self.stats.ctrl_errors += 1
                q.push(chain, 0)
                continue
            data = b"".join(mem.read(a, n) for a, n in chain.readable)
            ack = netctrl.VIRTIO_NET_OK if self._command(data) else netctrl.VIRTIO_NET_ERR
            if ack != netctrl.VIRTIO_NET_OK:
                self.stats.ctrl_errors += 1
            mem.write(chain.writable[0][0], bytes([ack]))
            q.push(chain, 1)
        self._rings.leave(q, in_flight)
        if pushed:
            self.signal_used(q)

    def _command(self, data: bytes) -> bool:
        return netctrl.apply_command(self, data, self._has)

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> netctrl.NetState:
        with self.lock:
            if self._offloaded:   # the kernel's ring indices, into the Virtqueues the transport saves
                self.quiesce()
                self.resume()
            f = self.rx_filter
            return netctrl.NetState(self.mac, self.link_up, self.announce_pending, self.queue_pairs, self.guest_offloads,
                            netctrl.RxFilter(f.promisc, f.allmulti, f.alluni, f.nomulti, f.nouni, f.nobcast,
                                             list(f.uni_macs), list(f.multi_macs), f.uni_overflow,
                                             f.multi_overflow))

    def check_state(self, state: object) -> netctrl.NetState:
        return netctrl.validate_state(state, self.max_pairs, GUEST_OFFLOADS)

    def restore(self, state: object) -> None:
        s = self.check_state(state)
        f = s.rx_filter
        with self.lock:
            self.mac, self.link_up, self.announce_pending = bytes(s.mac), s.link_up, s.announce
            self.queue_pairs, self.guest_offloads = s.queue_pairs, s.guest_offloads
            self._restored = True
            self.rx_filter = netctrl.RxFilter(f.promisc, f.allmulti, f.alluni, f.nomulti, f.nouni, f.nobcast,
                                              [bytes(m) for m in f.uni_macs], [bytes(m) for m in f.multi_macs],
                                              f.uni_overflow, f.multi_overflow)
