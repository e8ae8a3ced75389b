"""virtio-rng (device type 4): fills the guest's writable buffers from os.getrandom.

Each request is capped (`max_bytes_per_request`). Given a `call_later(delay, fn, *args)`
(the event loop's), each pass serves at most `max_bytes_per_notify` and the rest is picked up
`defer_s` later, so a guest cannot make the I/O thread spin on host entropy.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from kvmpy.devices.virtio.device import VIRTIO_ID_RNG, VirtioDevice
from kvmpy.devices.virtio.queue import slice_segments
from kvmpy.errors import DeviceError
from kvmpy.state import expect_state, versioned

log = logging.getLogger(__name__)


@versioned("virtio-rng", 1)
@dataclass
class RngState:
    """virtio-rng keeps nothing beyond its queue: every popped request is answered before
    `process_queue` returns. A pass cut short by the per-notify budget leaves the rest in the
    avail ring (not in the device) with a deferred kick; that kick is an event-loop timer, which
    a paused machine does not carry, so whoever restores or resumes the machine processes every
    ready queue once (kvmpy.machine's poll of all queues) and nothing the guest posted waits."""


class VirtioRng(VirtioDevice):
    """A backend serving host entropy (QEMU's virtio-rng)."""

    DEVICE_KIND: ClassVar[str] = "virtio-rng"
    device_type = VIRTIO_ID_RNG
    num_queues = 1
    name = "rng"
    pci_class = 0xFF0000

    def __init__(self, max_bytes_per_request: int = 4096, max_bytes_per_notify: int = 1 << 20,
                 call_later: Callable[..., Any] | None = None, defer_s: float = 0.01):
        super().__init__()
        if max_bytes_per_request <= 0 or max_bytes_per_notify < max_bytes_per_request:
            raise DeviceError("creating virtio-rng", detail="byte bounds must be positive and per-notify >= per-request")
        self.max_bytes_per_request = max_bytes_per_request
        self.max_bytes_per_notify = max_bytes_per_notify
        self.call_later = call_later
        self.defer_s = defer_s
        self.bytes_served = 0

    def process_queue(self, index: int) -> None:
        q = self.queues[index]
        mem = self.mem
        assert mem is not None
        budget = self.max_bytes_per_notify if self.call_later is not None else 1 << 62
        pushed = False
        while (chain := q.pop() if budget > 0 else None) is not None:
            want = min(chain.writable_len, self.max_bytes_per_request, budget)
            try:
                data = os.getrandom(want) if want else b""
            except OSError as e:
                raise DeviceError("reading host entropy", errno=e.errno) from None
            pos = 0
            for addr, n in slice_segments(chain.writable, 0, len(data)):
                mem.buffer(addr, n)[:] = data[pos:pos + n]
                pos += n
            q.push(chain, len(data))
            budget -= len(data)
            self.bytes_served += len(data)
            pushed = True
        if pushed:
            self.signal_used(q)
        if budget <= 0 and q.has_pending() and self.call_later is not None and self.kick is not None:
            self.call_later(self.defer_s, self.kick, index)

    def state(self) -> RngState:
        return RngState()

    def check_state(self, state: object) -> RngState:
        return expect_state(state, RngState, "virtio-rng state")
