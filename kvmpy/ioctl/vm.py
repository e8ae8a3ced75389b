"""A KVM VM fd: memory slots, in-kernel irqchip/PIT, irqfd/ioeventfd, routing, dirty logging."""
from __future__ import annotations

from typing import TYPE_CHECKING

from kvmpy.errors import IoctlError
from kvmpy.ioctl import request_numbers as nr
from kvmpy.ioctl._fd import FdObject
from kvmpy.ioctl._kvm import ffi, lib

if TYPE_CHECKING:
    import numpy as np

IrqRoute = tuple  # ("irqchip", gsi, chip, pin) or ("msi", gsi, address, data[, devid])


class Vm(FdObject):
    """One virtual machine. Owns the vCPUs it created (closed with it)."""

    def __init__(self, fd: int, kvm):
        super().__init__(fd, f"vm{fd}")
        self.kvm = kvm
        self.vcpus: list = []
        self.dirty_ring_bytes = 0

    # -- capabilities -----------------------------------------------------------------------
    def check_extension(self, cap: int) -> int:
        return self._call_int("KVM_CHECK_EXTENSION", nr.KVM_CHECK_EXTENSION, cap)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        if len(args) > 4:
            raise IoctlError(f"KVM_ENABLE_CAP({cap}) on {self.label}", detail="at most 4 arguments")
        req = ffi.new("struct kvm_enable_cap *")
        req.cap = cap
        req.flags = flags
        for i, a in enumerate(args):
            req.args[i] = a
        self._call(f"KVM_ENABLE_CAP({cap})", nr.KVM_ENABLE_CAP, req)

    # -- memory -----------------------------------------------------------------------------
    def set_user_memory_region(self, slot: int, guest_phys_addr: int, memory_size: int,
                               userspace_addr: int, flags: int = 0) -> None:
        region = ffi.new("struct kvm_userspace_memory_region *")
        region.slot = slot
        region.flags = flags
        region.guest_phys_addr = guest_phys_addr
        region.memory_size = memory_size
        region.userspace_addr = userspace_addr
        self._call(f"KVM_SET_USER_MEMORY_REGION(slot {slot})", nr.KVM_SET_USER_MEMORY_REGION, region)

    def set_tss_addr(self, addr: int) -> None:
        self._call_int("KVM_SET_TSS_ADDR", nr.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        value = ffi.new("__u64 *", addr)
        self._call("KVM_SET_IDENTITY_MAP_ADDR", nr.KVM_SET_IDENTITY_MAP_ADDR, value)

    # -- dirty logging ----------------------------------------------------------------------
    def get_dirty_log(self, slot: int, npages: int) -> "np.ndarray":
        """The slot's dirty bitmap (u64 words, bit i = page i); KVM clears it as it reads,
        unless manual protect is enabled."""
        import numpy as np
        bitmap = np.zeros((npages + 63) // 64, dtype=np.uint64)
        log = ffi.new("struct kvm_dirty_log *")
        log.slot = slot
        log.dirty_bitmap = ffi.from_buffer(bitmap)
        self._call(f"KVM_GET_DIRTY_LOG(slot {slot})", nr.KVM_GET_DIRTY_LOG, log)
        return bitmap

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int, bitmap: "np.ndarray") -> None:
        """Re-protect the pages whose bits are set (manual protect mode). first_page must be a
        multiple of 64 and the bitmap must cover num_pages."""
        import numpy as np
        words = np.ascontiguousarray(bitmap, dtype=np.uint64)
        if words.size * 64 < num_pages:
            raise IoctlError(f"KVM_CLEAR_DIRTY_LOG(slot {slot}) on {self.label}",
                             detail=f"bitmap of {words.size} words is short of {num_pages} pages")
        req = ffi.new("struct kvm_clear_dirty_log *")
        req.slot = slot
        req.first_page = first_page
        req.num_pages = num_pages
        req.dirty_bitmap = ffi.from_buffer(words)
        self._call(f"KVM_CLEAR_DIRTY_LOG(slot {slot})", nr.KVM_CLEAR_DIRTY_LOG, req)

    def enable_manual_dirty_log_protect(self) -> None:
        caps = self.check_extension(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        flags = lib.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        if not caps & flags:
            raise IoctlError(f"enabling manual dirty-log protect on {self.label}",
                             detail="KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 not supported")
        self.enable_cap(lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags)

    def dirty_ring_capability(self) -> int:
        """The cap to enable for dirty rings (ACQ_REL preferred), or 0 when unsupported."""
        for cap in (lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, lib.KVM_CAP_DIRTY_LOG_RING):
            if self.check_extension(cap):
                return cap
        return 0

    def enable_dirty_ring(self, ring_bytes: int) -> None:
        """Switch this VM to per-vCPU dirty rings of `ring_bytes`; before any vCPU exists."""
        cap = self.dirty_ring_capability()
        if not cap:
            raise IoctlError(f"enabling the dirty ring on {self.label}", detail="not supported by this KVM")
        if self.vcpus:
            raise IoctlError(f"enabling the dirty ring on {self.label}", detail="vCPUs already exist")
        self.enable_cap(cap, ring_bytes)
        self.dirty_ring_bytes = ring_bytes

    def harvest_dirty_rings(self) -> list[tuple[int, int]]:
        """(slot, page offset) for every entry collected from every vCPU's ring, marking each
        for reset; follow with reset_dirty_rings()."""
        out: list[tuple[int, int]] = []
        for vcpu in self.vcpus:
            out.extend(vcpu.harvest_dirty_ring())
        return out

    def reset_dirty_rings(self) -> int:
        """Let KVM re-protect the harvested pages and recycle ring entries."""
        return self._call_int("KVM_RESET_DIRTY_RINGS", nr.KVM_RESET_DIRTY_RINGS)

    # -- interrupts -------------------------------------------------------------------------
    def create_irqchip(self) -> None:
        self._call_int("KVM_CREATE_IRQCHIP", nr.KVM_CREATE_IRQCHIP)

    def create_pit2(self, flags: int = 0) -> None:
        cfg = ffi.new("struct kvm_pit_config *")
        cfg.flags = flags
        self._call("KVM_CREATE_PIT2", nr.KVM_CREATE_PIT2, cfg)

    def irq_line(self, irq: int, level: int) -> None:
        req = ffi.new("struct kvm_irq_level *")
        req.irq = irq
        req.level = 1 if level else 0
        self._call(f"KVM_IRQ_LINE({irq})", nr.KVM_IRQ_LINE, req)

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        req = ffi.new("struct kvm_irqfd *")
        req.fd = fd
        req.gsi = gsi
        if deassign:
            req.flags |= lib.KVM_IRQFD_FLAG_DEASSIGN
        if resample_fd is not None:
            req.flags |= lib.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resample_fd
        self._call(f"KVM_IRQFD(gsi {gsi})", nr.KVM_IRQFD, req)

    def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int | None = None,
                  pio: bool = False, deassign: bool = False) -> None:
        req = ffi.new("struct kvm_ioeventfd *")
        req.fd = fd
        req.addr = addr
        req.len = length
        if datamatch is not None:
            req.datamatch = datamatch
            req.flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
        if pio:
            req.flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            req.flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        self._call(f"KVM_IOEVENTFD({'pio' if pio else 'mmio'} {addr:#x})", nr.KVM_IOEVENTFD, req)

    def coalesced_io(self, addr: int, size: int, pio: bool = False, unregister: bool = False) -> None:
        """KVM_(UN)REGISTER_COALESCED_MMIO: guest writes inside [addr, addr+size) go to the VM's
        coalesced ring (mapped at KVM_COALESCED_MMIO_PAGE_OFFSET of every vCPU's kvm_run
        mapping) instead of exiting; `pio` needs KVM_CAP_COALESCED_PIO."""
        zone = ffi.new("struct kvm_coalesced_mmio_zone *")
        zone.addr = addr
        zone.size = size
        zone.pio = int(pio)
        name, req = (("KVM_UNREGISTER_COALESCED_MMIO", nr.KVM_UNREGISTER_COALESCED_MMIO) if unregister
                     else ("KVM_REGISTER_COALESCED_MMIO", nr.KVM_REGISTER_COALESCED_MMIO))
        self._call(f"{name}({'pio' if pio else 'mmio'} {addr:#x}+{size})", req, zone)

    def set_gsi_routing(self, routes: list[IrqRoute]) -> None:
        """Replace the GSI routing table. Routes: ("irqchip", gsi, chip, pin) or
        ("msi", gsi, address, data) / ("msi", gsi, address, data, devid)."""
        table = ffi.new("struct kvm_irq_routing *", {"entries": len(routes)})
        table.nr = len(routes)
        for i, route in enumerate(routes):
            entry = table.entries[i]
            kind, gsi = route[0], route[1]
            entry.gsi = gsi
            if kind == "irqchip":
                entry.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip, entry.u.irqchip.pin = route[2], route[3]
            elif kind == "msi":
                entry.type = lib.KVM_IRQ_ROUTING_MSI
                address = route[2]
                entry.u.msi.address_lo = address & 0xFFFFFFFF
                entry.u.msi.address_hi = address >> 32
                entry.u.msi.data = route[3]
                if len(route) > 4:
                    entry.flags = lib.KVM_MSI_VALID_DEVID
                    entry.u.msi.devid = route[4]
            else:
                raise IoctlError(f"KVM_SET_GSI_ROUTING on {self.label}", detail=f"unknown route kind {kind!r}")
        self._call("KVM_SET_GSI_ROUTING", nr.KVM_SET_GSI_ROUTING, table)

    def signal_msi(self, address: int, data: int, flags: int = 0, devid: int = 0) -> int:
        """Inject one MSI; returns >0 delivered, 0 blocked by the guest."""
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo = address & 0xFFFFFFFF
        msi.address_hi = address >> 32
        msi.data = data
        msi.flags = flags
        msi.devid = devid
        return self._call("KVM_SIGNAL_MSI", nr.KVM_SIGNAL_MSI, msi)

    def get_irqchip(self, chip_id: int):
        chip = ffi.new("struct kvm_irqchip *")
        chip.chip_id = chip_id
        self._call(f"KVM_GET_IRQCHIP({chip_id})", nr.KVM_GET_IRQCHIP, chip)
        return chip

    def set_irqchip(self, chip) -> None:
        self._call(f"KVM_SET_IRQCHIP({chip.chip_id})", nr.KVM_SET_IRQCHIP, chip)

    def get_pit2(self):
        state = ffi.new("struct kvm_pit_state2 *")
        self._call("KVM_GET_PIT2", nr.KVM_GET_PIT2, state)
        return state

    def set_pit2(self, state) -> None:
        self._call("KVM_SET_PIT2", nr.KVM_SET_PIT2, state)

    def get_clock(self):
        clock = ffi.new("struct kvm_clock_data *")
        self._call("KVM_GET_CLOCK", nr.KVM_GET_CLOCK, clock)
        return clock

    def set_clock(self, clock) -> None:
        self._call("KVM_SET_CLOCK", nr.KVM_SET_CLOCK, clock)

    # -- vCPUs ------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int):
        from kvmpy.ioctl.vcpu import Vcpu
        fd = self._call_int(f"KVM_CREATE_VCPU({vcpu_id})", nr.KVM_CREATE_VCPU, vcpu_id)
        try:
            vcpu = Vcpu(fd, vcpu_id, self)
        except BaseException:
            import os
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        super().close()
