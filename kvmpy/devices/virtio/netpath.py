"""virtio-net's rx/tx data path: the pure-Python reference (`place`, `tx_allowed`) and the C one
(kvmpy/ioctl/netfast.c through `CNet`), which does the same step for step with the GIL released.

Why C: host->guest TCP in userspace was bounded by Python, one popped chain per mergeable
buffer (a 64 KiB GSO frame fills 16-40 of them), at tens of microseconds each in the nested
harness. Which path runs follows the queue: a Virtqueue with the C walker (`q.cring`, see
fastpath.py; KVMPY_VIRTIO_C=0 turns it off) takes the C path; tier 0 plays the same traffic on
both and compares guest RAM, used rings and counters byte for byte.

Both paths place a frame the same way, buffer by buffer: each popped chain gets its share of
the frame as soon as it is popped; num_buffers (header bytes 10-11) is written last, once the
count is known. When the ring runs dry mid-frame the avail index is put back and the frame
waits: the bytes already copied sit in buffers the device still owns, and are written again.
"""
from __future__ import annotations

import os
import struct
from typing import Any, Callable

from kvmpy.devices.virtio import fastpath
from kvmpy.devices.virtio.netctrl import (F_CSUM, F_HOST_ECN, F_HOST_TSO4, F_HOST_TSO6, F_HOST_UFO,
                                          F_MRG_RXBUF, NetStats, RxFilter)
from kvmpy.devices.virtio.queue import DescChain, Virtqueue
from kvmpy.memslots import GuestMemory

HDR_LEN = 12                       # virtio_net_hdr_v1 (VERSION_1 is always negotiated)
MAX_FRAME = 65535 + 14 + 4         # a 64 KiB GSO frame, its Ethernet header and a VLAN tag
HDR_F_NEEDS_CSUM = 1
GSO_NONE, GSO_TCPV4, GSO_UDP, GSO_TCPV6, GSO_ECN = 0, 1, 3, 4, 0x80
_GSO_NEEDS = {GSO_TCPV4: F_HOST_TSO4, GSO_UDP: F_HOST_UFO, GSO_TCPV6: F_HOST_TSO6}
_NUM_BUFFERS = 10                  # offset of num_buffers in the header

AVAILABLE = fastpath.AVAILABLE and hasattr(fastpath.lib, "kvmpy_net_rx")
if AVAILABLE:
    _ffi, _lib = fastpath.ffi, fastpath.lib
    DRAINED, BURST, NOBUF, FILTER, NOTE = (_lib.KVMPY_NET_DRAINED, _lib.KVMPY_NET_BURST, _lib.KVMPY_NET_NOBUF,
                                           _lib.KVMPY_NET_FILTER, _lib.KVMPY_NET_NOTE)
else:
    DRAINED, BURST, NOBUF, FILTER, NOTE = range(5)
Warn = Callable[..., None]   # RateLimitedLog.warning(key, fmt, *args)


def tx_allowed(flags: int, gso: int, has: Callable[[int], bool]) -> bool:
    """May the guest ask the TAP for this header's offloads (what it negotiated)?"""
    need = _GSO_NEEDS.get(gso & ~GSO_ECN, None if gso & ~GSO_ECN else 0)
    return not (need is None or (need and not has(need)) or (gso & GSO_ECN and not has(F_HOST_ECN))
                or (flags & HDR_F_NEEDS_CSUM and not has(F_CSUM)))


def place(q: Virtqueue, mem: GuestMemory, frame: bytearray, mergeable: bool, stats: NetStats) -> bool | None:
    """Copy header+frame into the next rx chain(s). None: not enough buffers (the avail index is
    put back); False: dropped (a buffer too small without mergeable buffers); True: delivered.
    Chains too short for a header are returned unused (bad_buffers)."""
    total = len(frame)
    start = q.last_avail_idx
    chains: list[tuple[DescChain, int]] = []
    junk: list[DescChain] = []
    num_buffers_at: list[int] = []   # guest addresses of header bytes 10 and 11
    view = memoryview(frame)
    room = 0
    while room < total:
        chain = q.pop()
        if chain is None:
            q.last_avail_idx = start
            return None
        if chain.writable_len < HDR_LEN:
            junk.append(chain)
            stats.bad_buffers += 1
            continue
        take = min(chain.writable_len, total - room)
        if mergeable or take == total:
            pos, end = room, room + take
            for addr, n in chain.writable:
                if pos >= end:
                    break
                n = min(n, end - pos)
                if n == 0:
                    continue            # a zero-length buffer holds nothing; the next one takes the bytes
                mem.buffer(addr, n)[:] = view[pos:pos + n]
                num_buffers_at += [addr + b - pos for b in (_NUM_BUFFERS, _NUM_BUFFERS + 1) if pos <= b < pos + n]
                pos += n
        chains.append((chain, take))
        room += take
        if not mergeable:
            break
    if room < total:
        stats.rx_dropped += 1
        for chain, _ in chains:
            q.push(chain, 0)
    else:
        for addr, byte in zip(num_buffers_at, struct.pack("<H", len(chains))):
            mem.buffer(addr, 1)[0] = byte
        for chain, take in chains:
            q.push(chain, take)
        stats.rx_packets += 1
        stats.rx_bytes += total - HDR_LEN
    for chain in junk:
        q.push(chain, 0)
    return room >= total


class CNet:
    """One queue pair's record for the C data path: its TAP fd, a frame buffer (a frame that
    found no room waits here), scratch for one frame's chains, and the filter/offload summary
    the device copies in before each call (`sync`)."""

    def __init__(self, fd: int, max_chains: int):
        n = self.n = _ffi.new("struct kvmpy_net *")
        self._buf = _ffi.new("uint8_t[]", HDR_LEN + MAX_FRAME)
        self._heads = _ffi.new("uint32_t[]", 2 * max_chains)
        self._takes = _ffi.new("uint32_t[]", max_chains)
        n.fd, n.buf, n.buf_size = fd, self._buf, HDR_LEN + MAX_FRAME
        n.heads, n.takes, n.max_chains = self._heads, self._takes, max_chains
        self._features = -1

    def sync(self, mac: bytes, link_up: bool, f: RxFilter, features: int) -> None:
        n = self.n
        if features != self._features:   # fixed from DRIVER_OK to reset: derived once
            self._features = features
            n.mergeable, n.csum_ok, n.ecn_ok = bool(features & F_MRG_RXBUF), bool(features & F_CSUM), \
                bool(features & F_HOST_ECN)
            n.gso_ok = sum(1 << gso for gso, need in _GSO_NEEDS.items() if features & need)
        n.mac, n.link_up = mac, link_up
        n.promisc, n.nouni, n.nomulti, n.nobcast = f.promisc, f.nouni, f.nomulti, f.nobcast
        n.alluni, n.allmulti = f.alluni or f.uni_overflow, f.allmulti or f.multi_overflow

    def drop_pending(self) -> None:
        self.n.frame_len = 0

    def _call(self, fn: Any, q: Virtqueue, budget: int, stats: NetStats) -> int:
        n, ring = self.n, q.cring
        assert ring is not None
        vq = ring.vq
        n.budget = min(max(0, budget), 0xFFFFFFFF)   # an unbounded budget goes in slices
        vq.last_avail_idx, vq.used_idx = q.last_avail_idx, q.used_idx
        rc = fn(vq, n, ring.chain)
        q.last_avail_idx, q.used_idx = vq.last_avail_idx, vq.used_idx
        if q.mem.tracking:     # C marked the buffers it wrote; the used ring is marked here
            q.mark_used_ring()
        stats.rx_packets += n.rx_packets
        stats.rx_bytes += n.rx_bytes
        stats.rx_dropped += n.rx_dropped
        stats.rx_filtered += n.rx_filtered
        stats.bad_buffers += n.bad_buffers
        stats.tx_packets += n.tx_packets
        stats.tx_bytes += n.tx_bytes
        stats.tx_dropped += n.tx_dropped
        if rc == fastpath.ERROR:
            raise q.c_error()
        return rc

    def receive(self, q: Virtqueue, budget: int, accepts: Callable[[bytes], bool], stats: NetStats,
                warn: Warn) -> tuple[int, bool]:
        """VirtioNet._receive in C: (DRAINED, NOBUF or BURST, whether chains were pushed)."""
        pushed = False
        while True:
            rc = self._call(_lib.kvmpy_net_rx, q, budget, stats)
            pushed = pushed or self.n.pushed > 0
            budget -= self.n.done
            if rc == FILTER:   # the MAC tables are Python's: keep the frame (placed next call) or drop it
                if not accepts(bytes(_ffi.buffer(self._buf + HDR_LEN, 6))):
                    self.n.frame_len = 0
                    stats.rx_filtered += 1
                    budget -= 1
                continue
            if rc == NOTE:
                warn("tap-read", "virtio-net: reading the TAP failed: %s", _os_error(self.n.io_errno))
                return DRAINED, pushed
            if rc != BURST or budget <= 0:
                return rc, pushed

    def transmit(self, q: Virtqueue, budget: int, stats: NetStats, warn: Warn) -> tuple[int, bool]:
        """VirtioNet._transmit's loop in C: (the budget left, whether chains were pushed)."""
        pushed = False
        while True:
            rc = self._call(_lib.kvmpy_net_tx, q, budget, stats)
            pushed = pushed or self.n.pushed > 0
            budget -= self.n.done
            if rc == NOTE:
                warn("tap-write", "virtio-net: writing to the TAP failed: %s", _os_error(self.n.io_errno))
            elif rc != BURST or budget <= 0:
                return budget, pushed


def _os_error(errno: int) -> OSError:
    return OSError(errno, os.strerror(errno))
