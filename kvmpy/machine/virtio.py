"""Plugs virtio backends into PCI bus 0 and connects them to KVM for machine.py: an INTx line
per device, MSI-X vectors routed through the MsiRouter (GSI route + irqfd), and one ioeventfd per
queue notify address, serviced on the event loop so vCPU threads never run device code."""
from __future__ import annotations

import logging
import os
from typing import Callable

from kvmpy.boot.mptable import PciInterrupt
from kvmpy.devices.pci.host import PciRoot
from kvmpy.devices.virtio.device import VirtioDevice
from kvmpy.devices.virtio.transport import NO_VECTOR, VirtioPciDevice
from kvmpy.errors import DeviceError
from kvmpy.eventloop import EventLoop
from kvmpy.machine.interrupts import KvmIrqLine, MsiRouter
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
        if hasattr(backend, "watch_fd"):      # a backend that reads a host fd (virtio-net's TAP)
            backend.watch_fd = self.watch_fd
        bind = getattr(getattr(backend, "offload", None), "bind", None)
        if bind is not None:                  # a kernel data path (vhost-net)
            bind(KernelPath(self, dev))
        return PciInterrupt(slot=slot, pin=1, ioapic_pin=gsi)

    def watch_fd(self, fd: int, callback: Callable[[], None] | None) -> None:
        """Have the event loop call `callback` while `fd` is readable; None stops watching."""
        self.loop.remove_reader(fd)
        if callback is not None:
            self.loop.add_reader(fd, callback)

    def notify_eventfd(self, dev: VirtioPciDevice, queue: int) -> int | None:
        """The ioeventfd KVM signals for `queue`'s notify, while BAR0 is mapped."""
        return next((efd for (_g, _l, q, _m), efd in self._eventfds.get(dev, {}).items() if q == queue), None)

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

    def rewire_all(self) -> None:
        """Re-place the notify ioeventfds of every device whose BARs a restore moved (each
        (de)assignment is an ioctl that costs ~2 ms: a restore onto the same layout skips them)."""
        for dev in self.devices:
            wanted = {(na.gpa, na.length, na.queue_index, na.datamatch) for na in dev.notify_addresses()}
            if set(self._eventfds.get(dev, {})) != wanted:
                self._wire_notify(dev)

    def poll_all_queues(self) -> None:
        """Process whatever the driver queued on any ready queue (event-loop thread): at a pause,
        so no request the guest posted is left half way; after a restore or resume, so a
        notify that was swallowed by the pause is not lost."""
        for dev in self.devices:
            for q in range(len(dev.queues)):
                dev.handle_notify(q)

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


class KernelPath:
    """What one virtio-pci function lends a kernel data path (vhost): its queues' notify
    ioeventfds, taken out of the event loop so KVM signals the kernel directly (the path gets a
    dup, valid even if a BAR move re-places the original), and per queue an eventfd that
    interrupts the guest: the MSI-X vector's irqfd, or for INTx a relay through the event loop."""

    def __init__(self, wiring: VirtioPciWiring, dev: VirtioPciDevice):
        self.wiring, self.dev, self.mem = wiring, dev, wiring.mem
        self._kicks: dict[int, int] = {}
        self._relays: dict[int, int] = {}

    def take_kick(self, queue: int) -> int:
        efd = self.wiring.notify_eventfd(self.dev, queue)
        if efd is None:
            raise DeviceError(f"handing queue {queue} to the kernel", detail="its notify BAR is not mapped")
        self.wiring.loop.remove_reader(efd)
        self._kicks[queue] = dup = os.dup(efd)
        return dup

    def release_kick(self, queue: int) -> None:
        dup = self._kicks.pop(queue, None)
        if dup is not None:
            os.close(dup)
        efd = self.wiring.notify_eventfd(self.dev, queue)
        if efd is not None:
            dev = self.dev
            self.wiring.loop.remove_reader(efd)
            self.wiring.loop.add_eventfd(efd, lambda: dev.handle_notify(queue))

    def call_eventfd(self, queue: int) -> int:
        dev = self.dev
        vector = dev.queues[queue].msix_vector
        if dev.msix.enabled and vector != NO_VECTOR:
            efd = self.wiring.router.eventfd_for(dev, vector)
            if efd is not None:
                return efd
        relay = self._relays.get(queue)
        if relay is None:
            relay = self._relays[queue] = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

            def interrupt() -> None:
                with dev.lock:
                    dev._interrupt_queue(dev.queues[queue])
            self.wiring.loop.add_eventfd(relay, interrupt)
        return relay

    def release_call(self, queue: int) -> None:
        relay = self._relays.pop(queue, None)
        if relay is not None:
            self.wiring.loop.remove_reader(relay)
            os.close(relay)
