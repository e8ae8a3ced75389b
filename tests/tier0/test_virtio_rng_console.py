"""virtio-rng and virtio-console driven through the transport by the mock driver (no /dev/kvm)."""
import pytest

from kvmpy.devices.virtio.console import ConsoleState, MAX_PENDING_INPUT, VirtioConsole
from kvmpy.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from support.mock_driver import BumpAllocator, MockPciDriver
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from kvmpy.devices.virtio.rng import VirtioRng
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.errors import DeviceError, StateError
from kvmpy.memslots import GuestMemory


class Sink:
    def __init__(self):
        self.data = b""

    def write(self, data):
        self.data += data


@pytest.fixture
def mem():
    m = GuestMemory.create(1 << 20)
    yield m
    m.close()


def test_rng_fills_and_bounds(mem):
    deferred = []
    rng = VirtioRng(max_bytes_per_request=100, max_bytes_per_notify=110,
                    call_later=lambda delay, fn, *args: deferred.append((fn, args)))
    dev = VirtioPciDevice(rng, mem)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000))
    (q,) = drv.start(1)
    mem.fill(0x70000, 0x400, 0)
    heads = [q.add([(0x70000, 64, True), (0x70100, 64, True)]), q.add([(0x70200, 10, True)]),
             q.add([(0x70300, 10, True)])]
    dev.handle_notify(0)
    used = q.used()
    assert used == [(heads[0], 100), (heads[1], 10)]  # per-request cap, then per-notify budget stops
    assert mem.read(0x70100 + 36, 28) == bytes(28) and mem.read(0x70000, 64) != bytes(64)
    (fn, args), = deferred
    fn(*args)  # what the event loop would run a moment later
    assert q.used() == [(heads[2], 10)]
    with pytest.raises(DeviceError):
        VirtioRng(max_bytes_per_request=0)


def test_rng_readable_only_chain_gets_nothing(mem):
    dev = VirtioPciDevice(VirtioRng(), mem)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000))
    (q,) = drv.start(1)
    head = q.add([(0x70000, 64, False)])
    dev.handle_notify(0)
    assert q.used() == [(head, 0)]


def start_console(mem):
    sink = Sink()
    con = VirtioConsole(sink)
    dev = VirtioPciDevice(con, mem)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000))
    rx, tx = drv.start(2)
    return con, dev, drv, rx, tx, sink


def test_console_output_and_input(mem):
    con, dev, drv, rx, tx, sink = start_console(mem)
    assert drv.config(0, 2) == 80 and drv.config(4, 4) == 1
    mem.write(0x70000, b"hello ")
    mem.write(0x70100, b"world\n")
    tx.add([(0x70000, 6, False), (0x70100, 6, False)])
    drv.notify(1)
    assert sink.data == b"hello world\n" and tx.used()[0][1] == 0
    assert con.enqueue_input(b"early") == 5  # no receive buffers yet: held back
    head = rx.add([(0x71000, 3, True)])
    drv.notify(0)
    assert rx.used() == [(head, 3)] and mem.read(0x71000, 3) == b"ear"
    head = rx.add([(0x71000, 16, True)])
    drv.notify(0)
    assert rx.used() == [(head, 2)] and mem.read(0x71000, 2) == b"ly"
    head = rx.add([(0x71000, 16, True)])
    assert con.enqueue_input(b"typed") == 5
    assert rx.used() == [(head, 5)] and mem.read(0x71000, 5) == b"typed"


def test_console_input_skips_zero_length_buffers(mem):
    """A chain whose first writable buffer is empty still takes the input in the next ones (it
    used to be returned with 0 bytes, the input left waiting for another chain)."""
    con, dev, drv, rx, tx, sink = start_console(mem)
    head = rx.add([(0x71000, 0, True), (0x71100, 4, True), (0x71200, 0, True), (0x71300, 8, True)])
    assert con.enqueue_input(b"abcdefg") == 7
    assert rx.used() == [(head, 7)]
    assert mem.read(0x71100, 4) == b"abcd" and mem.read(0x71300, 3) == b"efg"


def test_console_input_is_bounded(mem):
    con, *_ = start_console(mem)
    assert con.enqueue_input(b"x" * (MAX_PENDING_INPUT + 10)) == MAX_PENDING_INPUT
    assert con.enqueue_input(b"y") == 0


def test_console_broken_receive_ring_resets_not_raises(mem):
    con, dev, drv, rx, tx, sink = start_console(mem)
    rx.write_desc(0, 1 << 30, 16, VIRTQ_DESC_F_WRITE)  # outside RAM
    rx.publish(0)
    assert con.enqueue_input(b"abc") == 3
    assert dev.status & STATUS_DEVICE_NEEDS_RESET


def test_console_state_round_trip(mem):
    con, dev, drv, rx, tx, sink = start_console(mem)
    con.enqueue_input(b"pending")
    s = dev.state()
    con2 = VirtioConsole(Sink())
    dev2 = VirtioPciDevice(con2, mem)
    dev2.restore(s)
    assert dev2.state() == s and s.device == ConsoleState(b"pending")
    s.device = ConsoleState(b"x" * (MAX_PENDING_INPUT + 1))
    with pytest.raises(StateError):
        dev2.restore(s)
