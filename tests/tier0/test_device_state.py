"""Every device's state through the one protocol (kvmpy/state.py), no /dev/kvm.

For each device (tests/tier0/device_cases.py): driven into a state that is not its reset state,
state() -> restore() into a FRESH device -> state() gives an equal value, made of plain data and
registered @versioned classes only, also through the stream codec; and hostile states (wrong
class, out-of-range ints, wrong byte sizes, wrong queue count, a bad field deep inside a nested
state) raise StateError and leave the device's state() exactly as it was.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest

from device_cases import (CASES, DATA, HOSTILE, RAM, Env, MsiSink, assert_plain, driven, driver,
                          new_virtio)
from kvmpy.devices import legacy
from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.devices.pci import PciRoot
from kvmpy.devices.pci.config import PciFunctionState
from kvmpy.devices.virtio.console import ConsoleState
from kvmpy.devices.virtio.rng import VirtioRng
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.errors import StateError
from kvmpy.memslots import GuestMemory
from kvmpy.migrate import codec, decoder
from kvmpy.state import STATE_CLASSES


@pytest.fixture
def env(tmp_path):
    e = Env(GuestMemory.create(RAM), tmp_path)
    yield e
    e.close()
    e.mem.close()


# -- the tests ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_into_a_fresh_device(name, env):
    dev = driven(name, env)
    s = dev.state()
    assert s != CASES[name].make(env).state(), "the drive left the device in its reset state"
    assert_plain(s)
    fresh = CASES[name].make(env)
    fresh.restore(s)
    assert fresh.state() == s
    assert dev.state() == s                       # taking the state changed nothing


@pytest.mark.parametrize("name,bad", HOSTILE)
def test_hostile_state_is_refused_and_changes_nothing(name, bad, env):
    dev = driven(name, env)
    good = dev.state()
    hostile = copy.deepcopy(good)
    CASES[name].hostile[bad](hostile)
    assert repr(hostile) != repr(good)          # (1 == True: compare the spelling)
    with pytest.raises(StateError):
        dev.restore(hostile)
    assert dev.state() == good


@pytest.mark.parametrize("name", list(CASES))
def test_wrong_class_is_refused(name, env):
    dev = driven(name, env)
    good = dev.state()
    foreign = legacy.PostCodeState() if name != "port80" else legacy.FastA20State()
    for bad in (None, object(), foreign, dataclasses.asdict(good)):
        with pytest.raises(StateError):
            dev.restore(bad)
    assert dev.state() == good


@pytest.mark.parametrize("name", list(CASES))
def test_device_kind(name, env):
    dev = CASES[name].make(env)
    assert dev.DEVICE_KIND == CASES[name].kind


def test_every_device_state_class_is_exercised(env):
    """A state class added under kvmpy/devices without a case here fails this test."""
    seen = {n for name in CASES for n in assert_plain(driven(name, env).state())}
    seen |= {n for name in CASES for n in assert_plain(CASES[name].make(env).state())}
    ours = {n for n, cls in STATE_CLASSES.items() if cls.__module__.startswith("kvmpy.devices.")}
    assert ours - seen == set()


def test_virtio_bad_last_field_leaves_the_device_working(env):
    """The backend state is the last thing checked: a bad one must not have reset anything
    before it was found (the queue goes on from where it was, the driver notices nothing)."""
    dev = new_virtio(VirtioRng(), env)
    (q,) = driver(dev, env).start(1, msix=True)
    q.add([(DATA, 16, True)])
    dev.handle_notify(0)
    assert len(q.used()) == 1
    good = dev.state()
    bad = copy.deepcopy(good)
    bad.device = ConsoleState(b"")
    with pytest.raises(StateError):
        dev.restore(bad)
    assert dev.state() == good
    head = q.add([(DATA, 8, True)])
    dev.handle_notify(0)
    assert q.used() == [(head, 8)]


def test_restored_virtio_device_serves_what_the_guest_posted(env):
    """After restore the fresh device goes on from the saved ring position: the chain the guest
    posted before the state was taken is served by the new device."""
    dev = driven("virtio-rng", env)
    fresh = CASES["virtio-rng"].make(env)
    fresh.restore(dev.state())
    used_before = env.mem.read_u16(fresh.queues[0].used_addr + 2)
    fresh.handle_notify(0)
    assert env.mem.read_u16(fresh.queues[0].used_addr + 2) == (used_before + 1) & 0xFFFF


def test_pci_root_state_syncs_the_latch_first():
    """The guest's last 0xCF8 write may still sit in KVM's coalesced ring: state() syncs."""
    class Latch:
        pci_addr = 0
    ring = [0x8000_0810]

    def sync() -> None:
        if ring:
            latch.pci_addr = ring.pop()
    root, latch = PciRoot(), Latch()
    root.attach_latch(latch, sync)
    assert root.state().config_address == 0x8000_0810
    other_latch = Latch()
    fresh = PciRoot()
    fresh.attach_latch(other_latch)
    fresh.restore(root.state())
    assert other_latch.pci_addr == 0x8000_0810


def test_pci_function_intx_level_survives(env):
    """The INTx level is not a field of its own: it comes back from the status register."""
    line = RecordingIrqLine()
    dev = new_virtio(VirtioRng(), env)
    dev.set_intx(True)
    fresh = VirtioPciDevice(VirtioRng(), env.mem, MsiSink(), line)
    fresh.restore(dev.state())
    assert line.level and fresh.state() == dev.state()
    assert isinstance(dev.state().pci, PciFunctionState)


@pytest.mark.parametrize("name", list(CASES))
def test_state_through_the_stream_codec(name, env):
    s = driven(name, env).state()
    decoded = decoder.decode_state(codec.encode_state(s))
    assert decoded == s
    fresh = CASES[name].make(env)
    fresh.restore(decoded)
    assert fresh.state() == s
