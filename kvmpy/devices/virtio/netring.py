"""A watch on virtio-net's ring indices, for issue 12's "virtio_net virtio0: output.0:id 0 is not a
head!" (seen in about 1 of 16 userspace runs in L1, not reproduced in tier 0).

Why this can be checked at all: every pass of virtio-net's userspace data path (tx, rx, control)
hands back every chain it pops before it returns, or puts the avail index back (rx without
room); so the number of chains in flight (last_avail_idx - used_idx) is the same after a pass as
before it. Between passes nothing but the device may move its indices, and the guest never
writes the used index. A pass that finds its indices changed behind it, a used index in guest
RAM other than the device's own, or chains left in flight after it, has found the kind of bug
that makes Linux see a used id that is not a head (an index written back by a stale copy, a
chain completed twice or never). It is counted (NetStats.ring_errors) and logged with the ring's
state, rate-limited (a guest can write its used index too); the device carries on, as before.
"""
from __future__ import annotations

from kvmpy.devices.virtio.netctrl import NetStats
from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.ratelimit import RateLimitedLog


class RingWatch:
    """Indices each queue had when the device's last pass over it ended (forgotten whenever
    someone else legitimately sets them: activation, reset, restore, the kernel's vhost)."""

    def __init__(self, stats: NetStats, ratelog: RateLimitedLog):
        self.stats, self._ratelog = stats, ratelog
        self._marks: dict[int, tuple[int, int]] = {}

    def forget(self) -> None:
        self._marks.clear()

    def enter(self, q: Virtqueue) -> int:
        """Before a pass over `q`: report indices moved behind the device; returns the chains in
        flight, for `leave`. (On every pass of the data path: a dict lookup and one u16 read.)"""
        last_avail, used = q.last_avail_idx, q.used_idx
        mark = self._marks.get(q.index)
        if mark is not None and mark != (last_avail, used):
            self._report(q, "its indices moved between passes", f"were {mark[0]}/{mark[1]}")
        if q.ready:     # an active queue's rings lie in RAM (Virtqueue.activate checked them)
            in_ram = q.mem.read_u16(q.used_addr + 2)
            if in_ram != used:
                self._report(q, "the used index in guest RAM is not the device's", f"RAM has {in_ram}")
        return (last_avail - used) & 0xFFFF

    def leave(self, q: Virtqueue, in_flight: int) -> None:
        """After a pass: every popped chain went back (or was put back); remember the indices."""
        last_avail, used = q.last_avail_idx, q.used_idx
        if (last_avail - used) & 0xFFFF != in_flight:
            self._report(q, "the pass left chains in flight",
                         f"{in_flight} before, {(last_avail - used) & 0xFFFF} after")
        self._marks[q.index] = (last_avail, used)

    def _report(self, q: Virtqueue, what: str, detail: str) -> None:
        self.stats.ring_errors += 1
        avail = q.mem.read_u16(q.avail_addr + 2) if q.ready else -1
        self._ratelog.warning(("ring", q.index), "virtio-net: queue %d: %s (%s; now last_avail %d, used %d, "
                              "avail idx in RAM %d, size %d; ring errors %d)", q.index, what, detail,
                              q.last_avail_idx, q.used_idx, avail, q.size, self.stats.ring_errors)
