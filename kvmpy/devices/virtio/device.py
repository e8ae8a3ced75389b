"""What a virtio device backend (blk, rng, console, ...) provides to the transport.

The transport owns registers, feature negotiation, queues and interrupts; a backend only says
which features and config it has and processes its queues when notified. Backends run on the
event-loop thread, under the transport's lock.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, ClassVar

from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.errors import StateError
from kvmpy.memslots import GuestMemory

# Status bits (virtio 1.2 section 2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 64
STATUS_FAILED = 128

# Reserved feature bits (section 6)
VIRTIO_F_RING_INDIRECT_DESC = 1 << 28
VIRTIO_F_RING_EVENT_IDX = 1 << 29
VIRTIO_F_VERSION_1 = 1 << 32
TRANSPORT_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX

VIRTIO_ID_NET, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_RNG = 1, 2, 3, 4


class VirtioDevice:
    """Base for backends. Subclasses set `device_type`, `num_queues`, `DEVICE_KIND`, and override
    `device_features`, `config_bytes`, `process_queue` (and `reset`, and `state`,
    `check_state` and `restore` when they keep state beyond their queues).

    A backend's state is only what the transport's state does not already hold (registers,
    queues and negotiated features are the transport's); it is nested in the transport's
    VirtioPciState as `device`, and validated with everything else before anything is applied."""

    DEVICE_KIND: ClassVar[str] = "virtio-device"   # QEMU's name; the PCI function adds "-pci"
    device_type = 0
    num_queues = 1
    queue_max_size = 256
    name = "virtio"

    def __init__(self) -> None:
        self.mem: GuestMemory | None = None
        self.queues: list[Virtqueue] = []
        self.driver_features = 0
        self.lock: threading.RLock = threading.RLock()
        self._interrupt: Callable[[Virtqueue], None] | None = None
        self.config_changed: Callable[[], None] | None = None  # set by the transport
        self.kick: Callable[[int], None] | None = None  # transport's handle_notify, for host-side work

    def device_features(self) -> int:
        return 0

    def config_bytes(self) -> bytes:
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        cfg = self.config_bytes()
        if offset < 0 or offset + size > len(cfg):
            return b"\x00" * size
        return cfg[offset:offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        """Most config fields are read-only; ignore writes unless a backend overrides."""

    def activate(self, mem: GuestMemory, queues: list[Virtqueue], interrupt: Callable[[Virtqueue], None],
                 driver_features: int) -> None:
        """DRIVER_OK: the queues are set up; the backend may start using them."""
        self.mem, self.queues, self._interrupt = mem, queues, interrupt
        self.driver_features = driver_features

    @property
    def active(self) -> bool:
        return self._interrupt is not None

    def process_queue(self, index: int) -> None:
        """Handle a notify on queue `index`; may raise QueueError (the transport resets us)."""

    def reset(self) -> None:
        """Drop per-driver state; the transport resets queues and registers."""
        self._interrupt = None
        self.queues = []
        self.driver_features = 0

    def signal_used(self, queue: Virtqueue) -> None:
        """After a batch of pushes: interrupt the driver if it asked for one."""
        if self._interrupt is not None and queue.should_notify():
            self._interrupt(queue)

    # -- state (the base: no state beyond the queues) --------------------------------------------
    def state(self) -> Any:
        return None

    def check_state(self, state: object) -> Any:
        """Validate a saved backend state without touching the backend; returns it."""
        if state is not None:
            raise StateError(f"restoring virtio-{self.name}",
                             detail=f"expected no backend state, got {type(state).__name__}")
        return None

    def restore(self, state: Any) -> None:
        """Validate (`check_state`), then load. The transport calls `check_state` on every part
        before it restores any, then this: a restore that checks again costs nothing."""
        self.check_state(state)
