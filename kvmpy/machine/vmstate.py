"""The VM-level state KVM keeps in the kernel: both PICs, the IOAPIC, the PIT and the KVM clock.

Kept as the kernel structs' bytes (like kvmpy.vcpu.state), so the capture is lossless and the
stream codec needs no x86 knowledge; `restore` checks every size before the first ioctl.

The clock: KVM's kvmclock keeps counting host time while vCPUs are parked. QEMU takes the clock
when the VM stops and puts it back when it runs again, so a pause (or a save and a restore hours
later) is invisible to the guest's monotonic clock: it continues where it stopped, it never jumps
backwards. `ClockKeeper` does the same.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from kvmpy.errors import IoctlError, StateError
from kvmpy.ioctl import Vm
from kvmpy.ioctl._kvm import ffi, lib
from kvmpy.state import check_bytes, check_int, expect_state, versioned

log = logging.getLogger(__name__)

PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2
IRQCHIP_BYTES = ffi.sizeof("struct kvm_irqchip")
PIT_BYTES = ffi.sizeof("struct kvm_pit_state2")


@versioned("kvm-vm", 1)
@dataclass
class VmState:
    """The in-kernel irqchip (chip id -> struct kvm_irqchip bytes), PIT and clock (ns)."""
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes | None          # None when the VM has no in-kernel PIT
    clock_ns: int

    def validate(self) -> None:
        what = "the VM state (PIC/IOAPIC/PIT/clock)"
        for name in ("pic_master", "pic_slave", "ioapic"):
            check_bytes(what, name, getattr(self, name), IRQCHIP_BYTES)
        if self.pit is not None:
            check_bytes(what, "pit", self.pit, PIT_BYTES)
        check_int(what, "clock_ns", self.clock_ns, bits=64)


def _chip_bytes(vm: Vm, chip_id: int) -> bytes:
    return bytes(ffi.buffer(vm.get_irqchip(chip_id)))


def capture_vm(vm: Vm, clock_ns: int | None = None, has_pit: bool = True) -> VmState:
    """Read the VM's in-kernel state; `clock_ns` overrides the clock (the value at pause)."""
    pit = bytes(ffi.buffer(vm.get_pit2())) if has_pit else None
    if clock_ns is None:
        clock_ns = vm.get_clock().clock
    return VmState(_chip_bytes(vm, PIC_MASTER), _chip_bytes(vm, PIC_SLAVE), _chip_bytes(vm, IOAPIC),
                   pit, clock_ns)


def restore_vm(vm: Vm, state: VmState, has_pit: bool = True) -> None:
    """Load `state` (validated first) into a VM built with the same irqchip/PIT layout."""
    expect_state(state, VmState, "the VM state")
    state.validate()
    if (state.pit is not None) != has_pit:
        raise StateError("restoring the VM state",
                         detail="the snapshot's PIT presence differs from this machine's")
    for chip_id, blob in ((PIC_MASTER, state.pic_master), (PIC_SLAVE, state.pic_slave),
                          (IOAPIC, state.ioapic)):
        chip = ffi.new("struct kvm_irqchip *")
        ffi.memmove(chip, blob, IRQCHIP_BYTES)
        if chip.chip_id != chip_id:
                raise StateError("restoring the VM state", detail=f"irqchip {chip_id} holds chip id {chip.chip_id}")
        vm.set_irqchip(chip)
    if state.pit is not None:
        pit = ffi.new("struct kvm_pit_state2 *")
        ffi.memmove(pit, state.pit, PIT_BYTES)
        vm.set_pit2(pit)
    set_clock(vm, state.clock_ns)


def set_clock(vm: Vm, clock_ns: int) -> None:
    clock = ffi.new("struct kvm_clock_data *")
    clock.clock = clock_ns
    vm.set_clock(clock)


class ClockKeeper:
    """Freeze the guest's kvmclock across pauses: take it when vCPUs park, put it back before
    they run again (QEMU's kvmclock vm_state_change)."""

    def __init__(self, vm: Vm):
        self.vm = vm
        self.frozen_ns: int | None = None

    def freeze(self) -> int:
        if self.frozen_ns is None:
            self.frozen_ns = self.vm.get_clock().clock
        return self.frozen_ns

    def thaw(self) -> None:
        if self.frozen_ns is not None:
            try:
                set_clock(self.vm, self.frozen_ns)
            except IoctlError as e:   # a clock that jumps is better than a guest that stays parked
                log.warning("could not put back the guest clock: %s", e)
            self.frozen_ns = None


def adjust_clock_supported(vm: Vm) -> bool:
    return bool(vm.check_extension(lib.KVM_CAP_ADJUST_CLOCK))
