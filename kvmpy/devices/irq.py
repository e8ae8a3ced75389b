"""Interrupt lines handed to devices. Devices never hold the VM: the composer (machine.py) gives
them one of these, backed by KVM_IRQ_LINE / irqfd on a real VM, or a recorder in tests."""
from __future__ import annotations

from typing import Protocol


class IrqLine(Protocol):
    """A level-triggered line (ISA/IOAPIC pin). `pulse()` is an edge: raise then lower."""

    def set_level(self, high: bool) -> None: ...

    def pulse(self) -> None: ...


class MsiSink(Protocol):
    """Delivers one MSI message (address, data), e.g. via KVM_SIGNAL_MSI or an irqfd route."""

    def signal_msi(self, address: int, data: int) -> None: ...


class RecordingIrqLine:
    """Test double: records every level change."""

    def __init__(self) -> None:
        self.level = False
        self.history: list[bool] = []

    def set_level(self, high: bool) -> None:
        self.level = bool(high)
        self.history.append(self.level)

    def pulse(self) -> None:
        self.set_level(True)
        self.set_level(False)

    @property
    def pulses(self) -> int:
        return sum(1 for a, b in zip(self.history, self.history[1:]) if a and not b)


class NullIrqLine:
    def set_level(self, high: bool) -> None:
        pass

    def pulse(self) -> None:
        pass
