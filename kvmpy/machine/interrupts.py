"""Interrupt glue between devices and KVM's in-kernel irqchip.

Devices see only IrqLine / MsiSink (kvmpy.devices.irq). Here those become KVM_IRQ_LINE for ISA
and PCI INTx pins, and, for MSI-X, one GSI route plus one irqfd per programmed vector: the event
loop writes an eventfd and KVM injects the interrupt, no ioctl per interrupt.
"""
from __future__ import annotations

import logging
import os
import threading

from kvmpy.devices.pci.msix import MsixVector
from kvmpy.ioctl import Vm

log = logging.getLogger(__name__)

PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2
IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS


def default_irqchip_routes() -> list[tuple]:
    """KVM's default table (GSI 0-15 on both PICs and the IOAPIC, 16-23 IOAPIC only):
    KVM_SET_GSI_ROUTING replaces the whole table, so it must be restated with every change."""
    routes: list[tuple] = []
    for gsi in range(16):
        if gsi != 2:
            routes.append(("irqchip", gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
    for pin in range(IOAPIC_PINS):
        routes.append(("irqchip", pin, IOAPIC, pin))
    return routes


class KvmIrqLine:
    """A level-triggered IOAPIC/PIC input driven with KVM_IRQ_LINE."""

    def __init__(self, vm: Vm, gsi: int):
        self.vm = vm
        self.gsi = gsi
        self.level = False

    def set_level(self, high: bool) -> None:
        high = bool(high)
        if high != self.level:
            self.level = high
            self.vm.irq_line(self.gsi, int(high))

    def pulse(self) -> None:
        self.vm.irq_line(self.gsi, 1)
        self.vm.irq_line(self.gsi, 0)
        self.level = False

    def __repr__(self) -> str:
        return f"KvmIrqLine(gsi={self.gsi})"


class MsiRouter:
    """Owns the VM's GSI routing table. Each MSI-X vector a guest programs gets a GSI, an MSI
    route and an irqfd; delivering it is one eventfd write. Messages with no route yet (or when
    routing is unavailable) fall back to KVM_SIGNAL_MSI."""

    def __init__(self, vm: Vm, use_irqfd: bool = True):
        self.vm = vm
        self.use_irqfd = use_irqfd
        self._lock = threading.Lock()
        self._next_gsi = FIRST_MSI_GSI
        self._routes: dict[int, tuple[int, int]] = {}        # gsi -> (address, data)
        self._gsi_of: dict[tuple[object, int], int] = {}     # (owner, vector) -> gsi
        self._efds: dict[int, int] = {}                      # gsi -> eventfd
        self._by_message: dict[tuple[int, int], int] = {}    # (address, data) -> eventfd
        self.signalled = 0

    def sink_for(self, owner: object) -> "DeviceMsiSink":
        return DeviceMsiSink(self, owner)

    def vector_changed(self, owner: object, vector: int, vec: MsixVector) -> None:
        if not self.use_irqfd:
            return
        with self._lock:
            key = (owner, vector)
            gsi = self._gsi_of.get(key)
            if gsi is None:
                gsi = self._next_gsi
                self._next_gsi += 1
                self._gsi_of[key] = gsi
            if self._routes.get(gsi) == (vec.address, vec.data):
                return
            self._routes[gsi] = (vec.address, vec.data)
            routes = default_irqchip_routes() + [("msi", g, a, d) for g, (a, d) in sorted(self._routes.items())]
            self.vm.set_gsi_routing(routes)
            if gsi not in self._efds:
                efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
                self.vm.irqfd(efd, gsi)
                self._efds[gsi] = efd
            self._by_message = {msg: self._efds[g] for g, msg in self._routes.items() if g in self._efds}

    def eventfd_for(self, owner: object, vector: int) -> int | None:
        """The irqfd eventfd of `owner`'s MSI-X `vector` once the guest has programmed it (for a
        kernel data path such as vhost to interrupt the guest without the VMM), else None."""
        with self._lock:
            gsi = self._gsi_of.get((owner, vector))
            return self._efds.get(gsi) if gsi is not None else None

    def signal(self, address: int, data: int) -> None:
        efd = self._by_message.get((address, data))
        self.signalled += 1
        if efd is not None:
            os.eventfd_write(efd, 1)
        else:
            self.vm.signal_msi(address, data)

    def close(self) -> None:
        with self._lock:
            for gsi, efd in self._efds.items():
                try:
                    self.vm.irqfd(efd, gsi, deassign=True)
                except Exception:  # the VM may already be closed; the fd still must go
                    pass
                os.close(efd)
            self._efds.clear()
            self._by_message = {}


class DeviceMsiSink:
    """The MsiSink one PCI function gets: remembers which function's vectors are whose."""

    def __init__(self, router: MsiRouter, owner: object):
        self.router = router
        self.owner = owner

    def signal_msi(self, address: int, data: int) -> None:
        self.router.signal(address, data)

    def vector_changed(self, vector: int, vec: MsixVector) -> None:
        self.router.vector_changed(self.owner, vector, vec)
