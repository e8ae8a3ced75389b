"""virtio-pci modern transport driven by the mock driver: capabilities, negotiation, reset,
interrupts (MSI-X and INTx), broken queues, PCI_CFG window, state round trip (no /dev/kvm)."""

import pytest

from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.devices.pci import PciRoot
from kvmpy.devices.virtio.device import (STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK,
                                         VIRTIO_F_VERSION_1)
from support.mock_driver import BumpAllocator, MockPciDriver
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from kvmpy.devices.virtio.rng import VirtioRng
from kvmpy.devices.virtio.transport import NOTIFY_OFFSET, VirtioPciDevice
from kvmpy.errors import StateError
from kvmpy.memslots import GuestMemory


class Sink:
    def __init__(self):
        self.messages = []

    def signal_msi(self, address, data):
        self.messages.append((address, data))


@pytest.fixture
def env():
    mem = GuestMemory.create(1 << 20)
    sink, line = Sink(), RecordingIrqLine()
    dev = VirtioPciDevice(VirtioRng(), mem, sink, line)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x80000))
    yield dev, drv, mem, sink, line
    mem.close()


def test_identity_and_capabilities(env):
    dev, drv, *_ = env
    assert dev.config_read(0, 2) == 0x1AF4 and dev.config_read(2, 2) == 0x1044
    assert dev.config_read(8, 1) == 1 and dev.config_read(0x2C, 2) == 0x1AF4
    assert set(drv.caps) == {1, 2, 3, 4, 5}
    assert dev.config_read(drv.caps[2][0] + 16, 4) == 4  # notify_off_multiplier
    assert drv.read(1, 0x12, 2) == 1  # num_queues


def test_negotiation_and_feature_rejection(env):
    dev, drv, *_ = env
    feats = drv.device_features()
    assert feats & VIRTIO_F_VERSION_1
    assert not drv.negotiate(feats & ~VIRTIO_F_VERSION_1)  # legacy-only driver refused
    assert not drv.negotiate(feats | 1 << 40)  # asks for something not offered
    assert drv.negotiate(VIRTIO_F_VERSION_1)
    drv.write(1, 0x08, 4, 0)
    drv.write(1, 0x0C, 4, 0xFFFF_FFFF)  # features frozen after FEATURES_OK
    assert dev.driver_features == VIRTIO_F_VERSION_1


def test_driver_ok_requires_features_ok(env):
    dev, drv, *_ = env
    drv.set_status(1 | 2 | STATUS_DRIVER_OK)
    assert not drv.status() & STATUS_DRIVER_OK


def test_rng_request_with_msix_and_reset(env):
    dev, drv, mem, sink, line = env
    (q,) = drv.start(1, msix=True)
    head = q.add([(0x90000 - 0x10000, 64, True)])
    drv.notify(0)
    assert q.used() == [(head, 64)]
    assert sink.messages == [(0xFEE00000, 0x41)] and not line.level
    drv.set_status(0)
    assert drv.status() == 0 and not dev.queues[0].ready and dev.driver_features == 0
    drv.write(1, 0x16, 2, 0)
    assert drv.read(1, 0x1C, 2) == 0 and drv.read(1, 0x20, 8) == 0


def test_intx_fallback_and_isr_read_to_clear(env):
    dev, drv, mem, sink, line = env
    (q,) = drv.start(1)
    q.add([(0x70000, 16, True)])
    drv.notify(0)
    assert line.level and sink.messages == []
    assert drv.read_isr() == 1
    assert not line.level and drv.read_isr() == 0


def test_queue_registers_frozen_once_enabled(env):
    dev, drv, *_ = env
    (q,) = drv.start(1)
    drv.write(1, 0x16, 2, 0)
    drv.write(1, 0x20, 4, 0x1234)
    assert drv.read(1, 0x20, 8) == q.desc_addr
    drv.write(1, 0x16, 2, 7)  # absent queue reads as zero
    assert drv.read(1, 0x18, 2) == 0


def test_broken_queue_sets_needs_reset(env):
    dev, drv, mem, sink, line = env
    (q,) = drv.start(1)
    q.write_desc(0, 0x70000, 16, VIRTQ_DESC_F_NEXT, 0)  # self-loop
    q.publish(0)
    drv.notify(0)
    assert drv.status() & STATUS_DEVICE_NEEDS_RESET
    assert drv.read_isr() & 2 and drv.read(1, 0x15, 1) == 1  # config change interrupt, generation bumped
    drv.notify(0)  # ignored while broken
    drv.start(1)
    assert not drv.status() & STATUS_DEVICE_NEEDS_RESET


def test_bad_ring_address_on_enable_sets_needs_reset(env):
    dev, drv, mem, *_ = env
    assert drv.negotiate()
    drv.write(1, 0x16, 2, 0)
    drv.write(1, 0x20, 8, (1 << 20) - 16)
    drv.write(1, 0x1C, 2, 1)
    assert drv.status() & STATUS_DEVICE_NEEDS_RESET and not dev.queues[0].ready


def test_notify_handler_and_addresses(env):
    dev, drv, *_ = env
    root = PciRoot()
    root.add(dev)
    (addr,) = dev.notify_addresses()
    assert addr.gpa == dev.bar_address(0) + NOTIFY_OFFSET and addr.queue_index == 0 and addr.length == 2
    kicks = []
    dev.notify_handler = kicks.append
    dev.bar_write(0, NOTIFY_OFFSET, b"\x00\x00")
    assert kicks == [0]


def test_pci_cfg_window(env):
    dev, drv, *_ = env
    cap = drv.caps[5][0]
    dev.config_write(cap + 4, 1, 0)           # bar 0
    dev.config_write(cap + 8, 4, 0x12)         # num_queues in common config
    dev.config_write(cap + 12, 4, 2)           # length 2
    assert dev.config_read(cap + 16, 2) == 1
    dev.config_write(cap + 8, 4, 0x14)         # device_status through the window
    dev.config_write(cap + 12, 4, 1)
    dev.config_write(cap + 16, 1, 1)
    assert drv.status() == 1


def test_state_round_trip(env):
    dev, drv, mem, sink, line = env
    (q,) = drv.start(1, msix=True)
    q.add([(0x70000, 16, True)])
    drv.notify(0)
    assert len(q.used()) == 1
    s = dev.state()
    other = VirtioPciDevice(VirtioRng(), mem, Sink(), RecordingIrqLine())
    other.restore(s)
    assert other.state() == s
    head = q.add([(0x70000, 16, True)])
    other.handle_notify(0)  # the restored device carries on from the same ring position
    assert q.used() == [(head, 16)]
    s.queues = s.queues[:0]
    with pytest.raises(StateError):
        other.restore(s)
