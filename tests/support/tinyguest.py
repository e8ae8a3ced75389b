"""The tests' tiny VM: kvmpy.vcpu.tinyguest.TinyVm (what `kvmpy bench exits` needs) plus the
set-ups only tier-1 tests want, an in-kernel irqchip and a dirty ring, named as flags."""
from __future__ import annotations

from kvmpy.ioctl import Vm
from kvmpy.vcpu.tinyguest import GUEST_DIR, LOAD_ADDR, TinyVm, enter_real_mode, guest_binary

__all__ = ["GUEST_DIR", "LOAD_ADDR", "TinyTestVm", "enter_real_mode", "guest_binary"]


class TinyTestVm(TinyVm):
    """A TinyVm whose create() also takes irqchip= and dirty_ring_bytes= (KVM needs both set up
    before any vCPU exists)."""

    @classmethod
    def create(cls, mem_bytes: int = 1 << 20, device: str = "/dev/kvm", vcpus: int = 1,  # type: ignore[override]
               slot_flags: int = 0, irqchip: bool = False, dirty_ring_bytes: int = 0) -> "TinyTestVm":
        def prepare(vm: Vm) -> None:
            if irqchip:
                vm.create_irqchip()
            if dirty_ring_bytes:
                vm.enable_dirty_ring(dirty_ring_bytes)
        tiny = super().create(mem_bytes, device, vcpus=vcpus, slot_flags=slot_flags, prepare_vm=prepare)
        assert isinstance(tiny, cls)
        return tiny
