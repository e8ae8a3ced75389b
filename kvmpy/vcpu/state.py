"""vCPU state as plain data (bytes/ints/dicts, picklable): capture from and restore into a vCPU.

Each register block is kept as the kernel struct's bytes, so capture/restore is lossless and the
stream codec needs no knowledge of x86. Restore validates every size before touching the vCPU:
the state may come from an untrusted migration stream.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kvmpy.errors import IoctlError, StateError
from kvmpy.ioctl import Vcpu
from kvmpy.ioctl._kvm import ffi

log = logging.getLogger(__name__)

STATE_VERSION = 1
# block name -> C struct whose bytes it holds (xsave may be larger: KVM_GET_XSAVE2)
BLOCKS = {
    "regs": "struct kvm_regs",
    "sregs": "struct kvm_sregs",
    "fpu": "struct kvm_fpu",
    "xcrs": "struct kvm_xcrs",
    "mp_state": "struct kvm_mp_state",
    "vcpu_events": "struct kvm_vcpu_events",
    "debugregs": "struct kvm_debugregs",
}
LAPIC_BYTES = ffi.sizeof("struct kvm_lapic_state")
MAX_MSRS = 4096


@dataclass
class VcpuState:
    """One vCPU's architectural state. `lapic` is None without an in-kernel irqchip."""
    vcpu_id: int
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    mp_state: bytes
    vcpu_events: bytes
    debugregs: bytes
    lapic: bytes | None = None
    msrs: dict[int, int] = field(default_factory=dict)
    version: int = STATE_VERSION

    def validate(self, xsave_bytes: int | None = None) -> None:
        """Raise StateError unless every block has the size this kvmpy build expects."""
        if self.version != STATE_VERSION:
            raise StateError("validating vCPU state", detail=f"version {self.version}, expected {STATE_VERSION}")
        if not isinstance(self.vcpu_id, int) or self.vcpu_id < 0:
            raise StateError("validating vCPU state", detail=f"bad vcpu id {self.vcpu_id!r}")
        for name, ctype in BLOCKS.items():
            _check_bytes(name, getattr(self, name), ffi.sizeof(ctype))
        if not isinstance(self.xsave, bytes) or len(self.xsave) < ffi.sizeof("struct kvm_xsave") \
                or len(self.xsave) % 4:
            raise StateError("validating vCPU state", detail="xsave block has a bad size")
        if xsave_bytes is not None and len(self.xsave) != xsave_bytes:
            raise StateError("validating vCPU state",
                             detail=f"xsave block is {len(self.xsave)} bytes, this vCPU uses {xsave_bytes}")
        if self.lapic is not None:
            _check_bytes("lapic", self.lapic, LAPIC_BYTES)
        if not isinstance(self.msrs, dict) or len(self.msrs) > MAX_MSRS:
            raise StateError("validating vCPU state", detail="msrs must be a dict of at most 4096 entries")
        for index, value in self.msrs.items():
            if not (isinstance(index, int) and isinstance(value, int)
                    and 0 <= index < 1 << 32 and 0 <= value < 1 << 64):
                raise StateError("validating vCPU state", detail=f"bad MSR entry {index!r}: {value!r}")


def _check_bytes(name: str, value: object, size: int) -> None:
    if not isinstance(value, bytes) or len(value) != size:
        got = len(value) if isinstance(value, (bytes, bytearray)) else type(value).__name__
        raise StateError("validating vCPU state", detail=f"{name}: expected {size} bytes, got {got}")


def _blob(cdata) -> bytes:
    return bytes(ffi.buffer(cdata))


def read_msrs(vcpu: Vcpu, indices: list[int]) -> dict[int, int]:
    """Every readable MSR among `indices` (KVM stops at the first unreadable one: skip it)."""
    values: dict[int, int] = {}
    pending = list(indices)
    while pending:
        got = vcpu.get_msrs(pending)
        values.update(got)
        pending = pending[len(got) + 1:]  # skip the one KVM could not read
    return values


def capture(vcpu: Vcpu, msr_indices: list[int] | None = None) -> VcpuState:
    """Snapshot a (stopped or paused) vCPU. msr_indices default: KVM's MSR index list."""
    if msr_indices is None:
        msr_indices = vcpu.vm.kvm.msr_index_list()
    try:
        lapic: bytes | None = _blob(vcpu.get_lapic())
    except IoctlError:
        lapic = None  # no in-kernel local APIC
    return VcpuState(
        vcpu_id=vcpu.id,
        regs=_blob(vcpu.get_regs()), sregs=_blob(vcpu.get_sregs()), fpu=_blob(vcpu.get_fpu()),
        xsave=_blob(vcpu.get_xsave()), xcrs=_blob(vcpu.get_xcrs()),
        mp_state=_blob(vcpu.get_mp_state()), vcpu_events=_blob(vcpu.get_vcpu_events()),
        debugregs=_blob(vcpu.get_debugregs()), lapic=lapic, msrs=read_msrs(vcpu, msr_indices))


def _cdata(ctype: str, data: bytes):
    out = ffi.new(ctype + " *")
    ffi.memmove(out, data, len(data))
    return out


def restore(vcpu: Vcpu, state: VcpuState) -> None:
    """Load `state` into `vcpu` (validated first), in the order KVM needs: registers, extended
    state, special registers, MSRs, then run state, LAPIC and pending events."""
    state.validate(xsave_bytes=vcpu.xsave_bytes)
    vcpu.set_regs(_cdata("struct kvm_regs", state.regs))
    vcpu.set_fpu(_cdata("struct kvm_fpu", state.fpu))
    xsave = ffi.new("struct kvm_xsave *", {"extra": (len(state.xsave) - ffi.sizeof("struct kvm_xsave")) // 4})
    ffi.memmove(xsave, state.xsave, len(state.xsave))
    vcpu.set_xsave(xsave)
    vcpu.set_xcrs(_cdata("struct kvm_xcrs", state.xcrs))
    vcpu.set_sregs(_cdata("struct kvm_sregs", state.sregs))
    _write_msrs(vcpu, state.msrs)
    vcpu.set_mp_state(_cdata("struct kvm_mp_state", state.mp_state))
    if state.lapic is not None:
        vcpu.set_lapic(_cdata("struct kvm_lapic_state", state.lapic))
    vcpu.set_vcpu_events(_cdata("struct kvm_vcpu_events", state.vcpu_events))
    vcpu.set_debugregs(_cdata("struct kvm_debugregs", state.debugregs))


def _write_msrs(vcpu: Vcpu, msrs: dict[int, int]) -> None:
    """Set all MSRs, skipping (and logging) any this KVM refuses, e.g. host-specific ones."""
    items = list(msrs.items())
    while items:
        done = vcpu.set_msrs_count(dict(items))
        if done >= len(items):
            return
        log.info("vCPU %d: KVM refused MSR %#x on restore; skipped", vcpu.id, items[done][0])
        items = items[done + 1:]
