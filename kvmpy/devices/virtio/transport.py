"""virtio-pci modern transport (virtio 1.2 section 4.1): one PCI function per virtio device.

BAR0 (64-bit, 32 KiB) holds the common config, ISR, device config, notify area and the MSI-X
table/PBA. Queue notifies are meant to arrive through ioeventfds (see `notify_addresses`) on
the event loop, which calls `handle_notify`; a notify that still traps as an MMIO write is
forwarded to `notify_handler` when the composer sets one, otherwise handled inline. A driver
that breaks a queue gets DEVICE_NEEDS_RESET and a config interrupt; the VMM carries on.
"""
from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable, ClassVar, NamedTuple

from kvmpy.devices.irq import IrqLine, MsiSink
from kvmpy.devices.pci.config import CAP_ID_VENDOR, PciFunction, PciFunctionState
from kvmpy.devices.pci.msix import MsixCapability, MsixState
from kvmpy.devices.virtio.device import (STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                                         TRANSPORT_FEATURES, VIRTIO_F_RING_EVENT_IDX,
                                         VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtioDevice)
from kvmpy.devices.virtio.queue import QueueError, Virtqueue, VirtqueueState
from kvmpy.errors import GuestMemoryError, KvmpyError, StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.memslots import GuestMemory
from kvmpy.state import check_int, expect_state, versioned

log = logging.getLogger(__name__)

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI = 1, 2, 3, 4, 5
BAR_INDEX, BAR_SIZE = 0, 0x8000
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x38
ISR_OFFSET, ISR_SIZE = 0x1000, 0x4
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_SIZE, NOTIFY_MULTIPLIER = 0x3000, 0x1000, 4
MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET = 0x4000, 0x6000
NO_VECTOR = 0xFFFF
ISR_QUEUE, ISR_CONFIG = 1, 2

# Common config fields: name -> (offset, size)
_COMMON = {
    "device_feature_select": (0x00, 4), "device_feature": (0x04, 4), "driver_feature_select": (0x08, 4),
    "driver_feature": (0x0C, 4), "config_msix_vector": (0x10, 2), "num_queues": (0x12, 2),
    "device_status": (0x14, 1), "config_generation": (0x15, 1), "queue_select": (0x16, 2),
    "queue_size": (0x18, 2), "queue_msix_vector": (0x1A, 2), "queue_enable": (0x1C, 2),
    "queue_notify_off": (0x1E, 2), "queue_desc": (0x20, 8), "queue_driver": (0x28, 8), "queue_device": (0x30, 8),
}
_COMMON_LAYOUT = struct.Struct("<IIIIHHBBHHHHHQQQ")


class NotifyAddress(NamedTuple):
    """Where the composer should put an ioeventfd: `length`-byte writes of `datamatch` at `gpa`
    notify queue `queue_index` (other widths/values still reach `bar_write`)."""
    gpa: int
    length: int
    queue_index: int
    datamatch: int


@versioned("virtio-pci", 1)
@dataclass
class VirtioPciState:
    """The function's config space, MSI-X, the common-config registers, every queue and the
    backend's own state (`device`: its @versioned state, or None for a backend with none)."""
    pci: PciFunctionState
    msix: MsixState
    device_feature_select: int
    driver_feature_select: int
    driver_features: int
    status: int
    config_generation: int
    queue_select: int
    config_msix_vector: int
    isr: int
    queues: list[VirtqueueState] = field(default_factory=list)
    device: object | None = None


class VirtioPciDevice(PciFunction):
    """Wraps a VirtioDevice backend in a PCI function with the modern virtio-pci layout.

    Its kind is the backend's plus "-pci", as QEMU spells it ("virtio-blk-pci")."""

    DEVICE_KIND: ClassVar[str] = "virtio-pci"

    def __init__(self, device: VirtioDevice, mem: GuestMemory, msi_sink: MsiSink | None = None,
                 intx: IrqLine | None = None):
        super().__init__(f"virtio-{device.name}", VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BASE + device.device_type,
                         getattr(device, "pci_class", 0xFF0000), revision=1,
                         subsystem_vendor_id=VIRTIO_PCI_VENDOR, subsystem_id=0x1100, irq_pin=1)
        self.DEVICE_KIND = f"{device.DEVICE_KIND}-pci"  # type: ignore[misc]  # per backend
        self.device = device
        self.mem = mem
        self.intx = intx
        self.lock = threading.RLock()
        device.lock = self.lock
        device.config_changed = self.config_changed
        device.kick = self.handle_notify
        self.notify_handler: Callable[[int], None] | None = None
        self.queues = [Virtqueue(mem, i, device.queue_max_size) for i in range(device.num_queues)]
        self._ratelog = RateLimitedLog(log)
        self.add_bar(BAR_INDEX, BAR_SIZE, is64=True)
        self._add_virtio_cap(CAP_COMMON, COMMON_OFFSET, COMMON_SIZE)
        self._add_virtio_cap(CAP_NOTIFY, NOTIFY_OFFSET, NOTIFY_SIZE, struct.pack("<I", NOTIFY_MULTIPLIER))
        self._add_virtio_cap(CAP_ISR, ISR_OFFSET, ISR_SIZE)
        self._add_virtio_cap(CAP_DEVICE, DEVICE_OFFSET, DEVICE_SIZE)
        self.pci_cfg_cap = self._add_virtio_cap(CAP_PCI, 0, 0, b"\x00" * 4,
                                                wmask=b"\x00\x00\xff\x00\x00\x00" + b"\xff" * 12)
        self.msix = MsixCapability(self, device.num_queues + 1, BAR_INDEX, MSIX_TABLE_OFFSET, MSIX_PBA_OFFSET,
                                   msi_sink)
        self._reset_registers()

    def _add_virtio_cap(self, cfg_type: int, offset: int, length: int, extra: bytes = b"",
                        wmask: bytes | None = None) -> int:
        body = struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, BAR_INDEX, 0, offset, length) + extra
        return self.add_capability(CAP_ID_VENDOR, body, wmask)

    def _reset_registers(self) -> None:
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.status = 0
        self.config_generation = 0
        self.queue_select = 0
        self.config_msix_vector = NO_VECTOR
        self.isr = 0
        for q in self.queues:
            q.reset()

    # -- public API for the composer -----------------------------------------------------------
    def notify_addresses(self) -> list[NotifyAddress]:
        """Current ioeventfd targets; empty while BAR0 is not decoded (re-query on bar_moved)."""
        base = self.mapped_bars().get(BAR_INDEX)
        if base is None:
            return []
        return [NotifyAddress(base + NOTIFY_OFFSET + NOTIFY_MULTIPLIER * q.index, 2, q.index, q.index)
                for q in self.queues]

    def handle_notify(self, queue_index: int) -> None:
        """The driver kicked `queue_index`: process it (event-loop thread)."""
        with self.lock:
            if self.broken or not self.status & STATUS_DRIVER_OK or not 0 <= queue_index < len(self.queues):
                return
            if not self.queues[queue_index].ready:
                return
            try:
                self.device.process_queue(queue_index)
            except (QueueError, GuestMemoryError) as e:
                self.mark_broken(str(e))
            except KvmpyError as e:
                self.mark_broken(f"device error: {e}")

    @property
    def broken(self) -> bool:
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    def mark_broken(self, reason: str) -> None:
        """Stop using the queues, set DEVICE_NEEDS_RESET and tell the driver (config interrupt)."""
        self._ratelog.warning("broken", "%s needs reset: %s", self.name, reason)
        self.status |= STATUS_DEVICE_NEEDS_RESET
        self.config_changed()

    def config_changed(self) -> None:
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self.isr |= ISR_CONFIG
            if not self.msix.notify(self.config_msix_vector):
                self.set_intx(True)

    def _interrupt_queue(self, queue: Virtqueue) -> None:
        if self.msix.enabled:
            if queue.msix_vector != NO_VECTOR:
                self.msix.notify(queue.msix_vector)
            return
        self.isr |= ISR_QUEUE
        self.set_intx(True)

    # -- config space hooks ---------------------------------------------------------------------
    def _config_written(self, offset: int, size: int, value: int) -> None:
        cap = self.msix.cap_offset
        if offset < cap + 4 and offset + size > cap:
            self.msix.control_written()
        data_off = self.pci_cfg_cap + 16
        if offset >= data_off and offset + size <= data_off + 4:
            target = self._pci_cfg_target()
            if target is not None:
                bar_off, length = target
                data = bytes(self.config[data_off:data_off + 4])
                self.bar_write(BAR_INDEX, bar_off, data[:length])

    def _special_read(self, offset: int, size: int) -> int | None:
        data_off = self.pci_cfg_cap + 16
        if offset >= data_off and offset + size <= data_off + 4:
            target = self._pci_cfg_target()
            if target is None:
                return 0
            bar_off, length = target
            val = int.from_bytes(self.bar_read(BAR_INDEX, bar_off, length), "little")
            return (val >> (8 * (offset - data_off))) & ((1 << (8 * size)) - 1)
        return None

    def _pci_cfg_target(self) -> tuple[int, int] | None:
        c = self.pci_cfg_cap
        bar = self.config[c + 4]
        bar_off, length = struct.unpack_from("<II", self.config, c + 8)
        if bar != BAR_INDEX or length not in (1, 2, 4) or bar_off % length or bar_off + length > BAR_SIZE:
            return None
        return bar_off, length

    # -- BAR0 ------------------------------------------------------------------------------------
    def bar_read(self, index: int, offset: int, size: int) -> bytes:
        with self.lock:
            if index != BAR_INDEX or size <= 0 or size > 8:
                return b"\x00" * max(size, 0)
            if COMMON_OFFSET <= offset and offset + size <= COMMON_OFFSET + COMMON_SIZE:
                return self._common_image()[offset - COMMON_OFFSET:offset - COMMON_OFFSET + size]
            if ISR_OFFSET <= offset < ISR_OFFSET + ISR_SIZE:
                value, self.isr = self.isr, 0  # read-to-clear, and INTx drops
                self.set_intx(False)
                return value.to_bytes(size, "little") if offset == ISR_OFFSET else b"\x00" * size
            if DEVICE_OFFSET <= offset and offset + size <= DEVICE_OFFSET + DEVICE_SIZE:
                return self.device.read_config(offset - DEVICE_OFFSET, size)
            if MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_size:
                return self.msix.table_read(offset - MSIX_TABLE_OFFSET, size)
            if MSIX_PBA_OFFSET <= offset < MSIX_PBA_OFFSET + self.msix.pba_size:
                return self.msix.pba_read(offset - MSIX_PBA_OFFSET, size)
            return b"\x00" * size

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        if index != BAR_INDEX or not 0 < len(data) <= 8:
            return
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_SIZE:
            q, rem = divmod(offset - NOTIFY_OFFSET, NOTIFY_MULTIPLIER)
            if rem == 0 and q < len(self.queues):
                if self.notify_handler is not None:
                    self.notify_handler(q)
                else:
                    self.handle_notify(q)
            return
        with self.lock:
            if COMMON_OFFSET <= offset and offset + len(data) <= COMMON_OFFSET + COMMON_SIZE:
                self._common_write(offset - COMMON_OFFSET, data)
            elif DEVICE_OFFSET <= offset and offset + len(data) <= DEVICE_OFFSET + DEVICE_SIZE:
                self.device.write_config(offset - DEVICE_OFFSET, data)
            elif MSIX_TABLE_OFFSET <= offset < MSIX_TABLE_OFFSET + self.msix.table_size:
                self.msix.table_write(offset - MSIX_TABLE_OFFSET, data)

    # -- common config -------------------------------------------------------------------------
    def _selected_queue(self) -> Virtqueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def _offered_features(self) -> int:
        return self.device.device_features() | TRANSPORT_FEATURES

    def _common_image(self) -> bytes:
        sel = self.device_feature_select
        dev_feat = (self._offered_features() >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0
        drv_sel = self.driver_feature_select
        drv_feat = (self.driver_features >> (32 * drv_sel)) & 0xFFFFFFFF if drv_sel < 2 else 0
        q = self._selected_queue()
        qf = (q.size, q.msix_vector, int(q.ready), q.index, q.desc_addr, q.avail_addr, q.used_addr) if q \
            else (0, NO_VECTOR, 0, 0, 0, 0, 0)
        return _COMMON_LAYOUT.pack(sel, dev_feat, drv_sel, drv_feat, self.config_msix_vector, len(self.queues),
                                   self.status, self.config_generation, self.queue_select, *qf)

    def _common_write(self, offset: int, data: bytes) -> None:
        image = bytearray(self._common_image())
        image[offset:offset + len(data)] = data
        end = offset + len(data)
        for name, (foff, fsize) in _COMMON.items():
            if foff < end and offset < foff + fsize:
                value = int.from_bytes(image[foff:foff + fsize], "little")
                self._set_common(name, value)

    def _valid_vector(self, v: int) -> int:
        return v if v < self.msix.num_vectors else NO_VECTOR

    def _set_common(self, name: str, value: int) -> None:
        q = self._selected_queue()
        if name == "device_feature_select":
            self.device_feature_select = value
        elif name == "driver_feature_select":
            self.driver_feature_select = value
        elif name == "driver_feature":
            sel = self.driver_feature_select
            if sel < 2 and not self.status & STATUS_FEATURES_OK:
                mask = 0xFFFFFFFF << (32 * sel)
                self.driver_features = (self.driver_features & ~mask) | (value << (32 * sel))
        elif name == "config_msix_vector":
            self.config_msix_vector = self._valid_vector(value)
        elif name == "device_status":
            self._set_status(value)
        elif name == "queue_select":
            self.queue_select = value
        elif q is None or q.ready:
            return  # queue registers are frozen once enabled (and absent queues ignore writes)
        elif name == "queue_size":
            q.size = value
        elif name == "queue_msix_vector":
            q.msix_vector = self._valid_vector(value)
        elif name == "queue_desc":
            q.desc_addr = value
        elif name == "queue_driver":
            q.avail_addr = value
        elif name == "queue_device":
            q.used_addr = value
        elif name == "queue_enable" and value == 1:
            try:
                q.activate(bool(self.driver_features & VIRTIO_F_RING_EVENT_IDX),
                           bool(self.driver_features & VIRTIO_F_RING_INDIRECT_DESC))
            except QueueError as e:
                self.mark_broken(str(e))

    def _set_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        new_bits = value & ~self.status
        if new_bits & STATUS_FEATURES_OK:
            offered = self._offered_features()
            if self.driver_features & ~offered or not self.driver_features & VIRTIO_F_VERSION_1:
                self._ratelog.warning("features", "%s: driver features %#x rejected (offered %#x)",
                                      self.name, self.driver_features, offered)
                value &= ~STATUS_FEATURES_OK
        if new_bits & STATUS_DRIVER_OK and not value & STATUS_FEATURES_OK:
            value &= ~STATUS_DRIVER_OK
        self.status = (value & ~STATUS_DEVICE_NEEDS_RESET) | (self.status & STATUS_DEVICE_NEEDS_RESET)
        if new_bits & STATUS_DRIVER_OK and self.status & STATUS_DRIVER_OK:
            self.device.activate(self.mem, self.queues, self._interrupt_queue, self.driver_features)
            for q in self.queues:  # buffers the driver queued before DRIVER_OK
                if q.ready and q.has_pending():
                    self.handle_notify(q.index)

    def reset(self) -> None:
        """Device reset (status 0): queues, features, interrupts and backend state."""
        with self.lock:
            self.device.reset()
            self._reset_registers()
            self.set_intx(False)
            self.msix.pending = 0

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> VirtioPciState:  # type: ignore[override]  # nests PciFunction's state
        with self.lock:
            # the backend first: one whose rings run elsewhere (vhost-net) reads their indices
            # back into the queues while saying its state, so the queues' states come after
            backend = self.device.state()
            return VirtioPciState(super().state(), self.msix.state(), self.device_feature_select,
                                  self.driver_feature_select, self.driver_features, self.status,
                                  self.config_generation, self.queue_select, self.config_msix_vector, self.isr,
                                  [q.state() for q in self.queues], backend)

    def check_state(self, state: object) -> VirtioPciState:  # type: ignore[override]
        """Validate every part (registers, config space, MSI-X, each queue, the backend) without
        touching any, so a bad field anywhere leaves the device exactly as it was."""
        what = f"{self.name} state"
        s = expect_state(state, VirtioPciState, what)
        for name, bits in (("device_feature_select", 32), ("driver_feature_select", 32),
                           ("driver_features", 64), ("status", 8), ("config_generation", 8),
                           ("queue_select", 16), ("config_msix_vector", 16), ("isr", 8)):
            check_int(what, name, getattr(s, name), bits=bits)
        if s.driver_features & ~self._offered_features():
            raise StateError(f"restoring {what}", detail="driver features not offered by this device")
        if s.status & STATUS_FEATURES_OK and not s.driver_features & VIRTIO_F_VERSION_1 or \
                s.status & STATUS_DRIVER_OK and not s.status & STATUS_FEATURES_OK:
            raise StateError(f"restoring {what}", detail=f"status {s.status:#x} the driver could not have reached")
        if s.isr & ~(ISR_QUEUE | ISR_CONFIG):
            raise StateError(f"restoring {what}", detail=f"isr={s.isr:#x} has reserved bits")
        if not isinstance(s.queues, (list, tuple)) or len(s.queues) != len(self.queues):
            raise StateError(f"restoring {what}", detail=f"queues are not a list of {len(self.queues)}")
        self._check_config_space(s.pci)
        self.msix.check_state(s.msix)
        vectors = [("config_msix_vector", s.config_msix_vector)]
        for q, qs in zip(self.queues, s.queues):
            vectors.append((f"queue {q.index} msix_vector", q.check_state(qs).msix_vector))
        for name, v in vectors:   # the transport only ever stores a vector that exists
            if v != NO_VECTOR and v >= self.msix.num_vectors:
                raise StateError(f"restoring {what}", detail=f"{name}={v} but {self.msix.num_vectors} vectors")
        self.device.check_state(s.device)
        return s

    def restore(self, state: VirtioPciState) -> None:  # type: ignore[override]
        with self.lock:
            s = self.check_state(state)
            # Everything is valid: apply. Each part's restore checks its part again (cheap) and
            # cannot fail now. Config space first (BAR moves reach the composer; the INTx line
            # follows the status register's bit), then MSI-X, queues (ready ones re-activated),
            # the backend, the registers; a DRIVER_OK backend is activated.
            self.device.reset()
            self._reset_registers()
            self._load_config_space(s.pci)
            self.msix.restore(s.msix)
            for q, qs in zip(self.queues, s.queues):
                q.restore(qs)
            self.device.restore(s.device)
            (self.device_feature_select, self.driver_feature_select, self.driver_features, self.status,
             self.config_generation, self.queue_select, self.config_msix_vector, self.isr) = (
                s.device_feature_select, s.driver_feature_select, s.driver_features, s.status,
                s.config_generation, s.queue_select, s.config_msix_vector, s.isr)
            if self.status & STATUS_DRIVER_OK:
                self.device.activate(self.mem, self.queues, self._interrupt_queue, self.driver_features)
