"""ioctl request numbers, computed from (direction, type, nr, struct) with ioctl_opt and cffi's
sizeof of the header's own struct: nothing is pasted, so a header change cannot go stale.

`TABLE` is what the tier-0 test compares against the C preprocessor's values.
"""
from __future__ import annotations

import ioctl_opt

from kvmpy.ioctl._kvm import ffi, lib

_DIRS = {"IO": ioctl_opt.IOC_NONE, "IOR": ioctl_opt.IOC_READ, "IOW": ioctl_opt.IOC_WRITE,
         "IOWR": ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE}

KVMIO = lib.KVMIO
VHOST_VIRTIO = lib.VHOST_VIRTIO

# name -> (direction, type, nr, C type of the argument or None)
TABLE: dict[str, tuple[str, int, int, str | None]] = {
    # /dev/kvm
    "KVM_GET_API_VERSION": ("IO", KVMIO, 0x00, None),
    "KVM_CREATE_VM": ("IO", KVMIO, 0x01, None),
    "KVM_GET_MSR_INDEX_LIST": ("IOWR", KVMIO, 0x02, "struct kvm_msr_list"),
    "KVM_CHECK_EXTENSION": ("IO", KVMIO, 0x03, None),
    "KVM_GET_VCPU_MMAP_SIZE": ("IO", KVMIO, 0x04, None),
    "KVM_GET_SUPPORTED_CPUID": ("IOWR", KVMIO, 0x05, "struct kvm_cpuid2"),
    # VM fd
    "KVM_CREATE_VCPU": ("IO", KVMIO, 0x41, None),
    "KVM_GET_DIRTY_LOG": ("IOW", KVMIO, 0x42, "struct kvm_dirty_log"),
    "KVM_SET_USER_MEMORY_REGION": ("IOW", KVMIO, 0x46, "struct kvm_userspace_memory_region"),
    "KVM_SET_TSS_ADDR": ("IO", KVMIO, 0x47, None),
    "KVM_SET_IDENTITY_MAP_ADDR": ("IOW", KVMIO, 0x48, "__u64"),
    "KVM_CREATE_IRQCHIP": ("IO", KVMIO, 0x60, None),
    "KVM_IRQ_LINE": ("IOW", KVMIO, 0x61, "struct kvm_irq_level"),
    "KVM_GET_IRQCHIP": ("IOWR", KVMIO, 0x62, "struct kvm_irqchip"),
    "KVM_SET_IRQCHIP": ("IOR", KVMIO, 0x63, "struct kvm_irqchip"),
    "KVM_SET_GSI_ROUTING": ("IOW", KVMIO, 0x6A, "struct kvm_irq_routing"),
    "KVM_IRQFD": ("IOW", KVMIO, 0x76, "struct kvm_irqfd"),
    "KVM_CREATE_PIT2": ("IOW", KVMIO, 0x77, "struct kvm_pit_config"),
    "KVM_IOEVENTFD": ("IOW", KVMIO, 0x79, "struct kvm_ioeventfd"),
    "KVM_REGISTER_COALESCED_MMIO": ("IOW", KVMIO, 0x67, "struct kvm_coalesced_mmio_zone"),
    "KVM_UNREGISTER_COALESCED_MMIO": ("IOW", KVMIO, 0x68, "struct kvm_coalesced_mmio_zone"),
    "KVM_SET_CLOCK": ("IOW", KVMIO, 0x7B, "struct kvm_clock_data"),
    "KVM_GET_CLOCK": ("IOR", KVMIO, 0x7C, "struct kvm_clock_data"),
    "KVM_GET_PIT2": ("IOR", KVMIO, 0x9F, "struct kvm_pit_state2"),
    "KVM_SET_PIT2": ("IOW", KVMIO, 0xA0, "struct kvm_pit_state2"),
    "KVM_ENABLE_CAP": ("IOW", KVMIO, 0xA3, "struct kvm_enable_cap"),
    "KVM_SIGNAL_MSI": ("IOW", KVMIO, 0xA5, "struct kvm_msi"),
    "KVM_CLEAR_DIRTY_LOG": ("IOWR", KVMIO, 0xC0, "struct kvm_clear_dirty_log"),
    "KVM_RESET_DIRTY_RINGS": ("IO", KVMIO, 0xC7, None),
    # vCPU fd
    "KVM_RUN": ("IO", KVMIO, 0x80, None),
    "KVM_GET_REGS": ("IOR", KVMIO, 0x81, "struct kvm_regs"),
    "KVM_SET_REGS": ("IOW", KVMIO, 0x82, "struct kvm_regs"),
    "KVM_GET_SREGS": ("IOR", KVMIO, 0x83, "struct kvm_sregs"),
    "KVM_TRANSLATE": ("IOWR", KVMIO, 0x85, "struct kvm_translation"),
    "KVM_SET_SREGS": ("IOW", KVMIO, 0x84, "struct kvm_sregs"),
    "KVM_GET_MSRS": ("IOWR", KVMIO, 0x88, "struct kvm_msrs"),
    "KVM_SET_MSRS": ("IOW", KVMIO, 0x89, "struct kvm_msrs"),
    "KVM_GET_FPU": ("IOR", KVMIO, 0x8C, "struct kvm_fpu"),
    "KVM_SET_FPU": ("IOW", KVMIO, 0x8D, "struct kvm_fpu"),
    "KVM_GET_LAPIC": ("IOR", KVMIO, 0x8E, "struct kvm_lapic_state"),
    "KVM_SET_LAPIC": ("IOW", KVMIO, 0x8F, "struct kvm_lapic_state"),
    "KVM_SET_CPUID2": ("IOW", KVMIO, 0x90, "struct kvm_cpuid2"),
    "KVM_GET_CPUID2": ("IOWR", KVMIO, 0x91, "struct kvm_cpuid2"),
    "KVM_GET_MP_STATE": ("IOR", KVMIO, 0x98, "struct kvm_mp_state"),
    "KVM_SET_MP_STATE": ("IOW", KVMIO, 0x99, "struct kvm_mp_state"),
    "KVM_GET_VCPU_EVENTS": ("IOR", KVMIO, 0x9F, "struct kvm_vcpu_events"),
    "KVM_SET_VCPU_EVENTS": ("IOW", KVMIO, 0xA0, "struct kvm_vcpu_events"),
    "KVM_GET_DEBUGREGS": ("IOR", KVMIO, 0xA1, "struct kvm_debugregs"),
    "KVM_SET_DEBUGREGS": ("IOW", KVMIO, 0xA2, "struct kvm_debugregs"),
    "KVM_SET_TSC_KHZ": ("IO", KVMIO, 0xA2, None),
    "KVM_GET_TSC_KHZ": ("IO", KVMIO, 0xA3, None),
    "KVM_GET_XSAVE": ("IOR", KVMIO, 0xA4, "struct kvm_xsave"),
    "KVM_SET_XSAVE": ("IOW", KVMIO, 0xA5, "struct kvm_xsave"),
    "KVM_GET_XCRS": ("IOR", KVMIO, 0xA6, "struct kvm_xcrs"),
    "KVM_SET_XCRS": ("IOW", KVMIO, 0xA7, "struct kvm_xcrs"),
    "KVM_GET_XSAVE2": ("IOR", KVMIO, 0xCF, "struct kvm_xsave"),
    "KVM_KVMCLOCK_CTRL": ("IO", KVMIO, 0xAD, None),
    "KVM_GET_NESTED_STATE": ("IOWR", KVMIO, 0xBE, "struct kvm_nested_state"),
    "KVM_SET_NESTED_STATE": ("IOW", KVMIO, 0xBF, "struct kvm_nested_state"),
    # vhost
    "VHOST_GET_FEATURES": ("IOR", VHOST_VIRTIO, 0x00, "__u64"),
    "VHOST_SET_FEATURES": ("IOW", VHOST_VIRTIO, 0x00, "__u64"),
    "VHOST_SET_OWNER": ("IO", VHOST_VIRTIO, 0x01, None),
    "VHOST_RESET_OWNER": ("IO", VHOST_VIRTIO, 0x02, None),
    "VHOST_SET_MEM_TABLE": ("IOW", VHOST_VIRTIO, 0x03, "struct vhost_memory"),
    "VHOST_SET_LOG_BASE": ("IOW", VHOST_VIRTIO, 0x04, "__u64"),
    "VHOST_SET_VRING_NUM": ("IOW", VHOST_VIRTIO, 0x10, "struct vhost_vring_state"),
    "VHOST_SET_VRING_ADDR": ("IOW", VHOST_VIRTIO, 0x11, "struct vhost_vring_addr"),
    "VHOST_SET_VRING_BASE": ("IOW", VHOST_VIRTIO, 0x12, "struct vhost_vring_state"),
    "VHOST_GET_VRING_BASE": ("IOWR", VHOST_VIRTIO, 0x12, "struct vhost_vring_state"),
    "VHOST_SET_VRING_KICK": ("IOW", VHOST_VIRTIO, 0x20, "struct vhost_vring_file"),
    "VHOST_SET_VRING_CALL": ("IOW", VHOST_VIRTIO, 0x21, "struct vhost_vring_file"),
    "VHOST_SET_VRING_ERR": ("IOW", VHOST_VIRTIO, 0x22, "struct vhost_vring_file"),
    "VHOST_NET_SET_BACKEND": ("IOW", VHOST_VIRTIO, 0x30, "struct vhost_vring_file"),
}


def compute(direction: str, kind: int, nr: int, ctype: str | None) -> int:
    """One request number, the way the kernel's _IO* macros build it."""
    size = ffi.sizeof(ctype) if ctype else 0
    return ioctl_opt.IOC(_DIRS[direction], kind, nr, size)


NUMBERS: dict[str, int] = {name: compute(*spec) for name, spec in TABLE.items()}
globals().update(NUMBERS)
