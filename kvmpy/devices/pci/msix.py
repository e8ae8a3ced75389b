"""MSI-X: the capability in config space, the vector table and the pending-bit array in a BAR.

Delivery goes to an injected MsiSink (KVM_SIGNAL_MSI or an irqfd route on a real VM, a recorder
in tests). The composer can also watch `on_vector_changed` to (re)program GSI routes for irqfds
whenever the guest rewrites an entry or a mask bit changes.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Callable

from kvmpy.devices.irq import MsiSink
from kvmpy.devices.pci.config import CAP_ID_MSIX, PciFunction
from kvmpy.errors import DeviceError, StateError
from kvmpy.state import check_bytes, check_int, expect_state, versioned

log = logging.getLogger(__name__)

MSIX_ENABLE = 0x8000
MSIX_FUNCTION_MASK = 0x4000
ENTRY_SIZE = 16
VECTOR_MASKED = 1
_ENTRY = struct.Struct("<QII")


@dataclass(frozen=True)
class MsixVector:
    address: int
    data: int
    masked: bool


@versioned("msix", 1)
@dataclass
class MsixState:
    """The vector table as the guest sees it and the pending bits (one per vector). The enable
    and function-mask bits live in config space (the function's state)."""
    table: bytes
    pending: int


class MsixCapability:
    """MSI-X for one function: `num_vectors` entries, table at `table_offset` and PBA at
    `pba_offset` inside BAR `bar` (the function forwards those BAR ranges here)."""

    def __init__(self, function: PciFunction, num_vectors: int, bar: int, table_offset: int, pba_offset: int,
                 sink: MsiSink | None = None):
        if not 1 <= num_vectors <= 2048 or table_offset % 8 or pba_offset % 8:
            raise DeviceError("creating MSI-X capability", detail=f"{num_vectors} vectors, bad offsets")
        self.function = function
        self.num_vectors = num_vectors
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.sink = sink
        self.on_vector_changed: Callable[[int, MsixVector], None] | None = None
        self.table = bytearray(ENTRY_SIZE * num_vectors)
        self.pending = 0
        for v in range(num_vectors):
            self.table[v * ENTRY_SIZE + 12] = VECTOR_MASKED
        body = struct.pack("<HII", num_vectors - 1, table_offset | bar, pba_offset | bar)
        self.cap_offset = function.add_capability(CAP_ID_MSIX, body, wmask=b"\x00\xc0")
        self.delivered = 0

    @property
    def table_size(self) -> int:
        return ENTRY_SIZE * self.num_vectors

    @property
    def pba_size(self) -> int:
        return ((self.num_vectors + 63) // 64) * 8

    @property
    def _control(self) -> int:
        return self.function._get(self.cap_offset + 2, 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control & MSIX_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control & MSIX_FUNCTION_MASK)

    def vector(self, v: int) -> MsixVector:
        address, data, ctrl = _ENTRY.unpack_from(self.table, v * ENTRY_SIZE)
        return MsixVector(address, data, bool(ctrl & VECTOR_MASKED))

    def vectors(self) -> list[MsixVector]:
        return [self.vector(v) for v in range(self.num_vectors)]

    # -- guest accesses -----------------------------------------------------------------------
    def control_written(self) -> None:
        """Called after any write to the capability: a function unmask may release pending."""
        self._deliver_pending()

    def table_read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.table_size:
            return b"\x00" * size
        return bytes(self.table[offset:offset + size])

    def table_write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or offset % size or offset < 0 or offset + size > self.table_size:
            return  # the spec only allows aligned dword/qword accesses; ignore the rest
        v = offset // ENTRY_SIZE
        before = self.vector(v)
        for i, b in enumerate(data):
            pos = offset + i
            field = pos % ENTRY_SIZE
            if field == 12:
                b = (self.table[pos] & ~VECTOR_MASKED) | (b & VECTOR_MASKED)
            elif field > 12:
                continue  # reserved vector-control bits stay zero
            self.table[pos] = b
        after = self.vector(v)
        if after != before:
            if self.on_vector_changed is not None:
                self.on_vector_changed(v, after)
            if before.masked and not after.masked:
                self._deliver_pending()

    def pba_read(self, offset: int, size: int) -> bytes:
        if offset < 0 or offset + size > self.pba_size:
            return b"\x00" * size
        return self.pending.to_bytes(self.pba_size, "little")[offset:offset + size]

    # -- device side --------------------------------------------------------------------------
    def notify(self, v: int) -> bool:
        """Signal vector `v`; returns False if MSI-X is disabled (the caller falls back to INTx).
        A masked vector is remembered in the PBA and delivered on unmask."""
        if not self.enabled:
            return False
        if not 0 <= v < self.num_vectors:
            return True  # an out-of-range vector was configured: nothing to deliver
        if self.function_masked or self.table[v * ENTRY_SIZE + 12] & VECTOR_MASKED:
            self.pending |= 1 << v
            return True
        self._send(v)
        return True

    def _send(self, v: int) -> None:
        address, data, _ = _ENTRY.unpack_from(self.table, v * ENTRY_SIZE)
        self.delivered += 1
        if self.sink is not None:
            self.sink.signal_msi(address, data)

    def _deliver_pending(self) -> None:
        if not self.pending or not self.enabled or self.function_masked:
            return
        for v in range(self.num_vectors):
            if self.pending >> v & 1 and not self.table[v * ENTRY_SIZE + 12] & VECTOR_MASKED:
                self.pending &= ~(1 << v)
                self._send(v)

    def reset(self) -> None:
        self.pending = 0
        for v in range(self.num_vectors):
            self.table[v * ENTRY_SIZE:(v + 1) * ENTRY_SIZE] = b"\x00" * 12 + bytes([VECTOR_MASKED, 0, 0, 0])

    # -- state --------------------------------------------------------------------------------
    def state(self) -> MsixState:
        return MsixState(bytes(self.table), self.pending)

    def check_state(self, state: object) -> MsixState:
        """Validate without touching the table: this capability's table size, pending bits only
        for existing vectors, and vector-control words with only the mask bit (all the guest
        can set)."""
        what = f"{self.function.name} MSI-X state"
        s = expect_state(state, MsixState, what)
        table = check_bytes(what, "table", s.table, size=self.table_size)
        check_int(what, "pending", s.pending, bits=self.num_vectors)
        for v in range(self.num_vectors):
            control = table[v * ENTRY_SIZE + 12:(v + 1) * ENTRY_SIZE]
            if control[0] & ~VECTOR_MASKED or any(control[1:]):
                raise StateError(f"restoring {what}", detail=f"vector {v} control has reserved bits")
        return s

    def restore(self, state: MsixState) -> None:
        """Check, then load and tell the composer about every vector (irqfd routes)."""
        s = self.check_state(state)
        self.table[:] = s.table
        self.pending = s.pending
        if self.on_vector_changed is not None:
            for v in range(self.num_vectors):
                self.on_vector_changed(v, self.vector(v))
