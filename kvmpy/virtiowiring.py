"""Plugs virtio backends into PCI bus 0 and connects them to KVM for machine.py: an INTx line
per device, MSI-X vectors routed through the MsiRouter (GSI route + irqfd), and one ioeventfd per
queue notify address, serviced on the event loop so vCPU threads never run device code."""
from __future__ import annotations

import logging
import os

from kvmpy.boot.mptable import PciInterrupt
from kvmpy.devices.pci.host import PciRoot
from kvmpy.devices.virtio.device import VirtioDevice
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.eventloop import EventLoop
from kvmpy.interrupts import KvmIrqLine, MsiRouter
from kvmpy.ioctl import Vm
from kvmpy.memslots import GuestMemory

log = logging.getLogger(__name__)

PCI_INTX_GSIS = (16, 17, 18, 19, 20, 21, 22, 23)   # IOAPIC pins above the ISA ones


class VirtioPciWiring:
    """Owns the virtio-pci functions of one VM and every fd that connects them to KVM."""

    def __init__(self, vm: Vm, mem: GuestMemory, pci: PciRoot, loop: EventLoop, router: MsiRouter):
        self.vm, self.mem, self.pci, self.loop, self.router = vm, mem, pci, loop, router
        self.devices: list[VirtioPciDevice] = []
        self._eventfds: dict[VirtioPciDevice, dict[tuple[int, int, int, int | None], int]] = {}
        pci.on_bar_moved = self.bar_moved

    def add(self, backend: VirtioDevice) -> PciInterrupt:
        """Plug `backend` into the next free slot; returns its INTx route for the MP/ACPI tables."""
        gsi = PCI_INTX_GSIS[len(self.devices) % len(PCI_INTX_GSIS)]
        dev = VirtioPciDevice(backend, self.mem, intx=KvmIrqLine(self.vm, gsi))
        sink = self.router.sink_for(dev)
        dev.msix.sink = sink
        dev.msix.on_vector_changed = sink.vector_changed
        loop = self.loop
        # A notify that still arrives as an MMIO exit (odd width/value) is queued, not run on the vCPU.
        dev.notify_handler = lambda queue, d=dev: loop.call_soon_threadsafe(d.handle_notify, queue)
        self.devices.append(dev)
        slot = self.pci.add(dev, intx=dev.intx, gsi=gsi)
        self._wire_notify(dev)
        return PciInterrupt(slot=slot, pin=1, ioapic_pin=gsi)

    def bar_moved(self, function: object, index: int, old: int | None, new: int | None) -> None:
        if isinstance(function, VirtioPciDevice) and function in self._eventfds:
            self._wire_notify(function)

    def _wire_notify(self, dev: VirtioPciDevice) -> None:
        """(Re)place one ioeventfd per queue at the device's current notify addresses."""
        self._unwire(dev, deassign=True)
        wired = {}
        for na in dev.notify_addresses():
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.vm.ioeventfd(efd, na.gpa, na.length, datamatch=na.datamatch)
            self.loop.add_eventfd(efd, lambda d=dev, q=na.queue_index: d.handle_notify(q))
            wired[(na.gpa, na.length, na.queue_index, na.datamatch)] = efd
        self._eventfds[dev] = wired

    def _unwire(self, dev: VirtioPciDevice, deassign: bool) -> None:
        for (gpa, length, _q, match), efd in self._eventfds.pop(dev, {}).items():
            if deassign:
                self.vm.ioeventfd(efd, gpa, length, datamatch=match, deassign=True)
            self.loop.remove_reader(efd)
            os.close(efd)

    def backend(self, kind: type) -> VirtioDevice | None:
        return next((d.device for d in self.devices if isinstance(d.device, kind)), None)

    def close(self) -> None:
        """Close fds and backends (image files, locks). The VM is going away: no deassigning."""
        for dev in list(self._eventfds):
            self._unwire(dev, deassign=False)
        for dev in self.devices:
            close = getattr(dev.device, "close", None)
            if close is not None:
                close()
        self.devices = []
