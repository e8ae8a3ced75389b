"""A KVM vCPU fd: the mmapped kvm_run page, KVM_RUN, and the register/state get/set ioctls.

Returns cffi cdata with the kernel's field names; no policy. `run()` reports EINTR (signal or
immediate_exit) as False instead of raising, since a kick is not an error.
"""
from __future__ import annotations

import errno as errno_mod
import mmap
import struct
from typing import TYPE_CHECKING, NamedTuple

from kvmpy.errors import IoctlError
from kvmpy.ioctl import request_numbers as nr
from kvmpy.ioctl._fd import FdObject
from kvmpy.ioctl._kvm import ffi, lib

if TYPE_CHECKING:
    import numpy as np

_MSR_ENTRY = struct.Struct("<IIQ")     # struct kvm_msr_entry
assert _MSR_ENTRY.size == ffi.sizeof("struct kvm_msr_entry")

PAGE_SIZE = mmap.PAGESIZE
XSAVE_LEGACY_BYTES = ffi.sizeof("struct kvm_xsave")
# struct kvm_dirty_gfn as a numpy dtype (numpy imported when a ring is mapped, not here)
DIRTY_GFN_FIELDS = [("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")]


class RunLayout:
    """Byte offsets inside struct kvm_run, from the compiler, for struct.unpack_from fast paths."""
    immediate_exit = ffi.offsetof("struct kvm_run", "immediate_exit")
    exit_reason = ffi.offsetof("struct kvm_run", "exit_reason")
    io = ffi.offsetof("struct kvm_run", "io")
    mmio = ffi.offsetof("struct kvm_run", "mmio")
    mmio_data = ffi.offsetof("struct kvm_run", "mmio", "data")


class IoExit(NamedTuple):
    direction: int
    size: int
    port: int
    count: int
    data_offset: int


class MmioExit(NamedTuple):
    phys_addr: int
    data: bytes
    len: int
    is_write: bool


class SystemEvent(NamedTuple):
    type: int
    data: tuple[int, ...]


class InternalError(NamedTuple):
    suberror: int
    data: tuple[int, ...]


class FailEntry(NamedTuple):
    hardware_entry_failure_reason: int
    cpu: int


class Vcpu(FdObject):
    """One vCPU. `run_map` is the kvm_run mapping (mmap object), `run_struct` the cdata view."""

    def __init__(self, fd: int, vcpu_id: int, vm):
        super().__init__(fd, f"vcpu{vcpu_id}")
        self.id = vcpu_id
        self.vm = vm
        self.mmap_size = vm.kvm.vcpu_mmap_size()
        try:
            self.run_map = mmap.mmap(fd, self.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as e:
            raise IoctlError(f"mmap of kvm_run for {self.label}", errno=e.errno) from None
        self.run_struct = ffi.from_buffer("struct kvm_run *", self.run_map)
        self._ring_map: mmap.mmap | None = None
        self._ring = None
        self._ring_entries = 0
        self._ring_fetch = 0
        if vm.dirty_ring_bytes:
            self._map_dirty_ring(vm.dirty_ring_bytes)
        xsave2 = vm.check_extension(lib.KVM_CAP_XSAVE2)
        self.xsave_bytes = max(xsave2, XSAVE_LEGACY_BYTES)

    # -- running ----------------------------------------------------------------------------
    def run(self) -> bool:
        """KVM_RUN with the GIL released. True: an exit to handle; False: interrupted (EINTR)."""
        ret = lib.kvmpy_run(self.fd)
        if ret < 0:
            if ret == -errno_mod.EINTR:
                return False
            raise IoctlError(f"KVM_RUN on {self.label}", errno=-ret)
        return True

    @property
    def exit_reason(self) -> int:
        return self.run_struct.exit_reason

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_struct.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_struct.immediate_exit = 1 if value else 0

    def io_exit(self) -> IoExit:
        io = self.run_struct.io
        return IoExit(io.direction, io.size, io.port, io.count, io.data_offset)

    def io_data(self) -> memoryview:
        """The I/O data buffer inside kvm_run (size*count bytes), writable for IN."""
        io = self.run_struct.io
        length = io.size * io.count
        if io.data_offset + length > self.mmap_size:
            raise IoctlError(f"reading the I/O exit of {self.label}", detail="data outside kvm_run")
        return memoryview(self.run_map)[io.data_offset:io.data_offset + length]

    def mmio_exit(self) -> MmioExit:
        m = self.run_struct.mmio
        return MmioExit(m.phys_addr, bytes(ffi.buffer(m.data, 8))[:min(m.len, 8)], m.len, bool(m.is_write))

    def system_event(self) -> SystemEvent:
        ev = self.run_struct.system_event
        return SystemEvent(ev.type, tuple(ev.data[i] for i in range(min(ev.ndata, 16))))

    def internal_error(self) -> InternalError:
        ie = self.run_struct.internal
        return InternalError(ie.suberror, tuple(ie.data[i] for i in range(min(ie.ndata, 16))))

    def fail_entry(self) -> FailEntry:
        fe = self.run_struct.fail_entry
        return FailEntry(fe.hardware_entry_failure_reason, fe.cpu)

    # -- registers and state ----------------------------------------------------------------
    def _get(self, ctype: str, name: str):
        out = ffi.new(ctype)
        self._call(name, getattr(nr, name), out)
        return out

    def get_regs(self):
        return self._get("struct kvm_regs *", "KVM_GET_REGS")

    def set_regs(self, regs) -> None:
        self._call("KVM_SET_REGS", nr.KVM_SET_REGS, regs)

    def get_sregs(self):
        return self._get("struct kvm_sregs *", "KVM_GET_SREGS")

    def set_sregs(self, sregs) -> None:
        self._call("KVM_SET_SREGS", nr.KVM_SET_SREGS, sregs)

    def translate(self, linear_address: int) -> int | None:
        """KVM_TRANSLATE: the guest-physical address of a guest-virtual one under the vCPU's
        current paging mode, or None when it is not mapped."""
        t = ffi.new("struct kvm_translation *")
        t.linear_address = linear_address
        self._call("KVM_TRANSLATE", nr.KVM_TRANSLATE, t)
        return int(t.physical_address) if t.valid else None

    def get_fpu(self):
        return self._get("struct kvm_fpu *", "KVM_GET_FPU")

    def set_fpu(self, fpu) -> None:
        self._call("KVM_SET_FPU", nr.KVM_SET_FPU, fpu)

    def get_xsave(self):
        """struct kvm_xsave * of xsave_bytes (KVM_GET_XSAVE2 when the area exceeds 4 KiB)."""
        extra_words = (self.xsave_bytes - XSAVE_LEGACY_BYTES) // 4
        out = ffi.new("struct kvm_xsave *", {"extra": extra_words})
        if extra_words:
            self._call("KVM_GET_XSAVE2", nr.KVM_GET_XSAVE2, out)
        else:
            self._call("KVM_GET_XSAVE", nr.KVM_GET_XSAVE, out)
        return out

    def set_xsave(self, xsave) -> None:
        self._call("KVM_SET_XSAVE", nr.KVM_SET_XSAVE, xsave)

    def get_xcrs(self):
        return self._get("struct kvm_xcrs *", "KVM_GET_XCRS")

    def set_xcrs(self, xcrs) -> None:
        self._call("KVM_SET_XCRS", nr.KVM_SET_XCRS, xcrs)

    def get_lapic(self):
        return self._get("struct kvm_lapic_state *", "KVM_GET_LAPIC")

    def set_lapic(self, lapic) -> None:
        self._call("KVM_SET_LAPIC", nr.KVM_SET_LAPIC, lapic)

    def get_mp_state(self):
        return self._get("struct kvm_mp_state *", "KVM_GET_MP_STATE")

    def set_mp_state(self, state) -> None:
        self._call("KVM_SET_MP_STATE", nr.KVM_SET_MP_STATE, state)

    def get_vcpu_events(self):
        return self._get("struct kvm_vcpu_events *", "KVM_GET_VCPU_EVENTS")

    def set_vcpu_events(self, events) -> None:
        self._call("KVM_SET_VCPU_EVENTS", nr.KVM_SET_VCPU_EVENTS, events)

    def get_debugregs(self):
        return self._get("struct kvm_debugregs *", "KVM_GET_DEBUGREGS")

    def set_debugregs(self, dregs) -> None:
        self._call("KVM_SET_DEBUGREGS", nr.KVM_SET_DEBUGREGS, dregs)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Values of the MSRs KVM could read; it stops at the first unreadable index."""
        # the entries go in and out as one packed buffer (struct kvm_msr_entry: u32 index,
        # u32 reserved, u64 data): per-entry cffi attribute access was 2 ms a vCPU in L1
        msrs = ffi.new("struct kvm_msrs *", {"entries": len(indices)})
        msrs.nmsrs = len(indices)
        entries = ffi.buffer(msrs.entries, len(indices) * _MSR_ENTRY.size)
        entries[:] = b"".join(_MSR_ENTRY.pack(index, 0, 0) for index in indices)
        got = self._call("KVM_GET_MSRS", nr.KVM_GET_MSRS, msrs)
        return {index: data for index, _, data in _MSR_ENTRY.iter_unpack(entries[:got * _MSR_ENTRY.size])}

    def set_msrs_count(self, values: dict[int, int]) -> int:
        """Write MSRs in order; returns how many KVM accepted (it stops at the first refusal)."""
        msrs = ffi.new("struct kvm_msrs *", {"entries": len(values)})
        msrs.nmsrs = len(values)
        ffi.buffer(msrs.entries, len(values) * _MSR_ENTRY.size)[:] = \
            b"".join(_MSR_ENTRY.pack(index, 0, data) for index, data in values.items())
        return self._call("KVM_SET_MSRS", nr.KVM_SET_MSRS, msrs)

    def set_msrs(self, values: dict[int, int]) -> int:
        """Write MSRs; raises naming the first MSR KVM refused."""
        items = list(values.items())
        done = self.set_msrs_count(values)
        if done != len(items):
            raise IoctlError(f"KVM_SET_MSRS on {self.label}",
                             detail=f"KVM refused MSR {items[done][0]:#x} ({done} of {len(items)} set)")
        return done

    def set_cpuid2(self, entries) -> None:
        """entries: a struct kvm_cpuid2 * (e.g. from Kvm.supported_cpuid()) or a list of
        struct kvm_cpuid_entry2 cdata."""
        if isinstance(entries, ffi.CData) and ffi.typeof(entries) is ffi.typeof("struct kvm_cpuid2 *"):
            cpuid = entries
        else:
            entries = list(entries)
            cpuid = ffi.new("struct kvm_cpuid2 *", {"entries": len(entries)})
            cpuid.nent = len(entries)
            for i, entry in enumerate(entries):
                cpuid.entries[i] = entry[0] if ffi.typeof(entry).kind == "pointer" else entry
        self._call("KVM_SET_CPUID2", nr.KVM_SET_CPUID2, cpuid)

    def kvmclock_ctrl(self) -> None:
        """KVM_KVMCLOCK_CTRL: tell the guest (through its kvmclock page) that the host stopped it,
        so its soft-lockup watchdog does not fire after a pause. EINVAL when the guest has not
        set up kvmclock; callers decide whether that matters."""
        self._call_int("KVM_KVMCLOCK_CTRL", nr.KVM_KVMCLOCK_CTRL)

    def get_nested_state(self, max_size: int) -> bytes:
        """The vCPU's nested-virtualization state (header + format data), `max_size` from
        KVM_CAP_NESTED_STATE; only the `size` bytes KVM reports are returned."""
        buf = ffi.new("char[]", max_size)
        state = ffi.cast("struct kvm_nested_state *", buf)
        state.size = max_size
        self._call("KVM_GET_NESTED_STATE", nr.KVM_GET_NESTED_STATE, state)
        return bytes(ffi.buffer(buf, min(state.size, max_size)))

    def set_nested_state(self, data: bytes) -> None:
        buf = ffi.new("char[]", data)
        self._call("KVM_SET_NESTED_STATE", nr.KVM_SET_NESTED_STATE, ffi.cast("struct kvm_nested_state *", buf))

    def get_tsc_khz(self) -> int:
        return self._call_int("KVM_GET_TSC_KHZ", nr.KVM_GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        self._call_int("KVM_SET_TSC_KHZ", nr.KVM_SET_TSC_KHZ, khz)

    def enable_cap(self, cap: int, *args: int, flags: int = 0) -> None:
        req = ffi.new("struct kvm_enable_cap *")
        req.cap = cap
        req.flags = flags
        for i, a in enumerate(args[:4]):
            req.args[i] = a
        self._call(f"KVM_ENABLE_CAP({cap})", nr.KVM_ENABLE_CAP, req)

    # -- dirty ring -------------------------------------------------------------------------
    def _map_dirty_ring(self, ring_bytes: int) -> None:
        import numpy as np
        try:
            self._ring_map = mmap.mmap(self.fd, ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                       offset=lib.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
        except OSError as e:
            raise IoctlError(f"mmap of the dirty ring for {self.label}", errno=e.errno) from None
        dtype = np.dtype(DIRTY_GFN_FIELDS)
        assert dtype.itemsize == ffi.sizeof("struct kvm_dirty_gfn")
        self._ring = np.frombuffer(self._ring_map, dtype=dtype)
        self._ring_entries = len(self._ring)

    def harvest_dirty_ring(self) -> list[tuple[int, int]]:
        """Collect (slot, page offset) of dirty entries and flag them for KVM_RESET_DIRTY_RINGS."""
        slots, offsets = self.harvest_dirty_ring_arrays()
        return list(zip(slots.tolist(), offsets.tolist()))

    def harvest_dirty_ring_arrays(self) -> "tuple[np.ndarray, np.ndarray]":
        """(slots, page offsets) of the entries KVM published since the last harvest, in ring
        order, each flagged for KVM_RESET_DIRTY_RINGS. One numpy pass, not a loop: the ring
        holds an entry per page the guest wrote, thousands per harvest while migrating.
        KVM publishes an entry by storing its flags last (release), so reading the flags first
        and then the entries they mark (x86 keeps loads in order) sees whole entries."""
        import numpy as np
        ring = self._ring
        if ring is None:
            empty = np.zeros(0, dtype=np.uint64)
            return empty.astype(np.uint32), empty
        n = self._ring_entries
        order = (self._ring_fetch + np.arange(n)) % n
        published = (ring["flags"][order] & lib.KVM_DIRTY_GFN_F_DIRTY) != 0
        count = n if published.all() else int(np.argmin(published))
        taken = order[:count]
        slots, offsets = ring["slot"][taken], ring["offset"][taken]
        ring["flags"][taken] = lib.KVM_DIRTY_GFN_F_RESET
        self._ring_fetch += count
        return slots, offsets

    def close(self) -> None:
        self._ring = None                   # the numpy view, before its mmap closes
        cdata = getattr(self, "run_struct", None)
        if cdata is not None:
            ffi.release(cdata)
            self.run_struct = None
        for attr in ("run_map", "_ring_map"):
            m = getattr(self, attr, None)
            if m is not None:
                m.close()
                setattr(self, attr, None)
        super().close()
