"""The VM a live migration's dirty log reads belongs to the machine, which closes it on a reboot
or when the guest ends. The 32 MiB round of bench-migrate failed with
`KVM_CLEAR_DIRTY_LOG(slot 0) on vm10: EBADF`: the fd closed between the tracker reading it and
the ioctl. DirtyTracker.detach(cause), called by the closer first, waits out an ioctl in flight
and turns every later one into a MigrationError naming the cause, without touching the VM."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from kvmpy.errors import MigrationError
from kvmpy.memslots import GuestMemory
from kvmpy.memslots.dirty import DirtyTracker

from test_migrate_precopy_dirty import FakeVm

PAGE = 4096


class ClosingVm(FakeVm):
    """A FakeVm that records every call after `closed` is set (a call on a closed VM fd) and
    whose clear_dirty_log can be held in flight."""

    def __init__(self, memory: GuestMemory):
        super().__init__(memory, manual=True)
        self.closed = False
        self.calls_after_close: list[str] = []
        self.hold: threading.Event | None = None
        self.in_flight = threading.Event()

    def _note(self, name: str) -> None:
        if self.closed:
            self.calls_after_close.append(name)

    def get_dirty_log(self, slot, npages):
        self._note("get_dirty_log")
        return super().get_dirty_log(slot, npages)

    def clear_dirty_log(self, slot, first, count, words):
        self._note("clear_dirty_log")
        if self.hold is not None:
            self.in_flight.set()
            assert self.hold.wait(30)
        return super().clear_dirty_log(slot, first, count, words)

    def set_user_memory_region(self, slot, gpa, size, addr, flags=0):
        self._note("set_user_memory_region")
        return super().set_user_memory_region(slot, gpa, size, addr, flags)


@pytest.fixture
def tracked():
    memory = GuestMemory.create(4 << 20)
    vm = ClosingVm(memory)
    tracker = DirtyTracker(memory, vm)
    tracker.start()
    yield memory, vm, tracker
    memory.close()


def dirty_some(vm: ClosingVm, memory: GuestMemory) -> None:
    slot = memory.ranges[0].slot
    vm.log[slot][[0, 5, 700]] = True


def test_after_detach_no_call_reaches_the_vm_and_each_names_the_cause(tracked):
    memory, vm, tracker = tracked
    dirty_some(vm, memory)
    assert tracker.sync() == 3
    tracker.detach("the machine ended (guest kernel panic: Attempted to kill init!)")
    vm.closed = True
    for call in (tracker.sync, lambda: tracker.take(0, 0, 1024)):
        with pytest.raises(MigrationError) as info:
            call()
        assert "guest kernel panic: Attempted to kill init!" in str(info.value)
        assert "EBADF" not in str(info.value)
    tracker.stop()          # the migration's clean-up: nothing to switch off on a closed VM
    assert vm.calls_after_close == []
    assert not tracker.active


def test_detach_waits_for_an_ioctl_in_flight(tracked):
    """The closer must not close the fd while the migration thread is inside an ioctl on it."""
    memory, vm, tracker = tracked
    dirty_some(vm, memory)
    tracker.sync()
    vm.hold = threading.Event()
    taken: dict = {}
    migration = threading.Thread(target=lambda: taken.update(dirty=tracker.take(0, 0, 1024)), daemon=True)
    migration.start()
    assert vm.in_flight.wait(30)
    closer = threading.Thread(target=tracker.detach, args=("the guest rebooted",), daemon=True)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive(), "detach returned while KVM_CLEAR_DIRTY_LOG was still in flight"
    vm.hold.set()
    migration.join(30)
    closer.join(30)
    assert not closer.is_alive() and not migration.is_alive()
    assert np.flatnonzero(taken["dirty"]).tolist() == [0, 5, 700]      # the call in flight completed
    assert tracker.detached == "the guest rebooted"


def test_the_first_cause_is_kept(tracked):
    _, _, tracker = tracked
    tracker.detach("the guest rebooted")
    tracker.detach("the machine ended (stopped by the host)")
    with pytest.raises(MigrationError, match="the guest rebooted"):
        tracker.sync()
