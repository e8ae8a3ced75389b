"""virtio-console (device type 3), a single port (hvc0): transmitq output goes to a sink with
`write(bytes)`, input is pushed with `enqueue_input(bytes)` and delivered into receiveq buffers.

Pending input is bounded; when the guest has posted no receive buffers, input waits there
(and excess is refused, the return value says how much was taken).
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import ClassVar, Protocol

from kvmpy.devices.virtio.device import VIRTIO_ID_CONSOLE, VirtioDevice
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import check_bytes, expect_state, versioned

log = logging.getLogger(__name__)

RECEIVEQ, TRANSMITQ = 0, 1
MAX_PENDING_INPUT = 64 * 1024
MAX_OUTPUT_PER_NOTIFY = 1 << 20


class ConsoleSink(Protocol):
    def write(self, data: bytes) -> object: ...


@versioned("virtio-console", 1)
@dataclass
class ConsoleState:
    """Host input accepted but not yet delivered (the guest had posted no receive buffer).
    Output is never buffered here: each transmit chain goes to the sink before it is returned."""
    pending_input: bytes


class VirtioConsole(VirtioDevice):
    """One console port, hvc0 (QEMU's virtio-serial with a virtconsole on it)."""

    DEVICE_KIND: ClassVar[str] = "virtio-serial"
    device_type = VIRTIO_ID_CONSOLE
    num_queues = 2
    name = "console"
    pci_class = 0x078000

    def __init__(self, sink: ConsoleSink, cols: int = 80, rows: int = 25):
        super().__init__()
        self.sink = sink
        self.cols, self.rows = cols, rows
        self._pending = bytearray()
        self._ratelog = RateLimitedLog(log)

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", self.cols, self.rows, 1, 0)

    def enqueue_input(self, data: bytes) -> int:
        """Queue host input for the guest (any thread); returns how many bytes were accepted."""
        with self.lock:
            take = min(len(data), MAX_PENDING_INPUT - len(self._pending))
            self._pending += data[:take]
            if self.active and self.kick is not None:
                self.kick(RECEIVEQ)  # through the transport, so a broken ring resets the device
            return take

    def process_queue(self, index: int) -> None:
        if index == RECEIVEQ:
            self._deliver_input()
        elif index == TRANSMITQ:
            self._transmit()

    def _transmit(self) -> None:
        q = self.queues[TRANSMITQ]
        mem = self.mem
        assert mem is not None
        budget = MAX_OUTPUT_PER_NOTIFY
        pushed = False
        while budget > 0 and (chain := q.pop()) is not None:
            for addr, n in chain.readable:
                n = min(n, budget)
                if n:
                    try:
                        self.sink.write(mem.read(addr, n))
                    except OSError as e:
                        self._ratelog.warning("sink", "virtio-console output failed: %s", e)
                budget -= n
            q.push(chain, 0)
            pushed = True
        if pushed:
            self.signal_used(q)

    def _deliver_input(self) -> None:
        if not self._pending or len(self.queues) <= RECEIVEQ or not self.queues[RECEIVEQ].ready:
            return
        q = self.queues[RECEIVEQ]
        mem = self.mem
        assert mem is not None
        pushed = False
        while self._pending and (chain := q.pop()) is not None:
            written = 0
            for addr, n in chain.writable:
                if n == 0:              # a zero-length buffer first must not end the chain
                    continue
                piece = self._pending[written:written + n]
                if not piece:
                    break
                mem.write(addr, bytes(piece))
                written += len(piece)
            del self._pending[:written]
            q.push(chain, written)
            pushed = True
        if pushed:
            self.signal_used(q)

    def state(self) -> ConsoleState:
        with self.lock:
            return ConsoleState(bytes(self._pending))

    def check_state(self, state: object) -> ConsoleState:
        s = expect_state(state, ConsoleState, "virtio-console state")
        check_bytes("virtio-console state", "pending_input", s.pending_input, max_size=MAX_PENDING_INPUT)
        return s

    def restore(self, state: ConsoleState) -> None:
        state = self.check_state(state)
        with self.lock:
            self._pending = bytearray(state.pending_input)
