"""A guest writes K chosen pages; the dirty bitmap / dirty ring holds exactly those."""
from __future__ import annotations

import numpy as np
import pytest

from kvmpy.devices.bus import Bus
from kvmpy.ioctl import Kvm, lib
from kvmpy.memslots import bitmap_to_pages
from kvmpy.vcpu.dispatch import ExitDispatcher, Outcome
from support.tinyguest import TinyTestVm

from kvm_host import (KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
                      KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, host_check_extension)

PAGES = [5, 17, 64, 100, 200, 255]  # all outside the code page (1) and the table page (3)
TABLE = 0x3000
NPAGES = 256


def run_dirty_guest(tiny: TinyTestVm, pages: list[int]) -> None:
    tiny.memory.write(TABLE, np.array(pages, dtype="<u2").tobytes())
    tiny.load("dirty", rcx=len(pages), rsi=TABLE)
    disp = ExitDispatcher(tiny.vcpu.run_map, Bus("pio", 1 << 16), Bus("mmio", 1 << 48))
    for _ in range(1000):
        assert tiny.vcpu.run()
        outcome = disp.dispatch()
        if outcome:
            assert outcome == Outcome.HALT, disp.detail
            return
    raise AssertionError("dirty guest did not halt")


def test_dirty_bitmap_holds_exactly_the_written_pages(kvm_available):
    with TinyTestVm.create(slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES) as tiny:
        tiny.vm.get_dirty_log(0, NPAGES)  # start from a clean log
        run_dirty_guest(tiny, PAGES)
        dirty = bitmap_to_pages(tiny.vm.get_dirty_log(0, NPAGES), NPAGES)
        assert dirty.tolist() == PAGES
        for i, page in enumerate(PAGES):  # and the guest really wrote them
            assert tiny.memory.read(page * 4096, 1)[0] == len(PAGES) - i
        assert bitmap_to_pages(tiny.vm.get_dirty_log(0, NPAGES), NPAGES).tolist() == []


def test_manual_protect_reports_until_cleared(kvm_available):
    with TinyTestVm.create(slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES) as tiny:
        if not host_check_extension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2) & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            pytest.skip("this host's KVM lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (168)")
        tiny.vm.enable_manual_dirty_log_protect()  # the host has it: kvmpy must enable it
        bitmap = tiny.vm.get_dirty_log(0, NPAGES)
        tiny.vm.clear_dirty_log(0, 0, NPAGES, bitmap)
        run_dirty_guest(tiny, PAGES[:3])
        first = tiny.vm.get_dirty_log(0, NPAGES)
        assert bitmap_to_pages(first, NPAGES).tolist() == PAGES[:3]
        # not cleared yet: still reported
        assert bitmap_to_pages(tiny.vm.get_dirty_log(0, NPAGES), NPAGES).tolist() == PAGES[:3]
        tiny.vm.clear_dirty_log(0, 0, NPAGES, first)
        assert bitmap_to_pages(tiny.vm.get_dirty_log(0, NPAGES), NPAGES).tolist() == []


def test_dirty_ring_holds_exactly_the_written_pages(kvm_available):
    host = {cap: host_check_extension(cap, on_vm=True) for cap in (KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING)}
    if not any(host.values()):
        pytest.skip("this host's KVM lacks KVM_CAP_DIRTY_LOG_RING (192) and _ACQ_REL (223)")
    with Kvm() as kvm, kvm.create_vm() as probe:  # kvmpy picks the one the host has, ACQ_REL first
        expected = KVM_CAP_DIRTY_LOG_RING_ACQ_REL if host[KVM_CAP_DIRTY_LOG_RING_ACQ_REL] else KVM_CAP_DIRTY_LOG_RING
        assert probe.dirty_ring_capability() == expected
    with TinyTestVm.create(dirty_ring_bytes=4096 * 16, slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES) as tiny:
        run_dirty_guest(tiny, PAGES)
        entries = tiny.vm.harvest_dirty_rings()
        assert sorted({offset for slot, offset in entries}) == PAGES
        assert {slot for slot, _ in entries} == {0}
        tiny.vm.reset_dirty_rings()
        assert tiny.vm.harvest_dirty_rings() == []
        run_dirty_guest(tiny, PAGES[:2])  # re-protected after reset: reported again
        assert sorted({offset for _, offset in tiny.vm.harvest_dirty_rings()}) == PAGES[:2]


def test_dirty_ring_harvest_wraps_around_the_ring(kvm_available):
    """A 256-entry ring harvested and reset after each of 60 runs: the fetch index passes the
    ring's end (entry 255 to 0) and every harvest still holds exactly the pages of its run."""
    if not host_check_extension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL, on_vm=True) \
            and not host_check_extension(KVM_CAP_DIRTY_LOG_RING, on_vm=True):
        pytest.skip("this host's KVM lacks KVM_CAP_DIRTY_LOG_RING (192) and _ACQ_REL (223)")
    with TinyTestVm.create(dirty_ring_bytes=4096, slot_flags=lib.KVM_MEM_LOG_DIRTY_PAGES) as tiny:
        harvested = 0
        for round_ in range(60):
            pages = PAGES if round_ % 2 else PAGES[::-1]
            run_dirty_guest(tiny, pages)
            slots, offsets = tiny.vcpu.harvest_dirty_ring_arrays()
            assert sorted(set(offsets.tolist())) == PAGES and set(slots.tolist()) <= {0}
            harvested += len(offsets)
            tiny.vm.reset_dirty_rings()
        assert harvested > 256 * 1.2       # went round the ring
