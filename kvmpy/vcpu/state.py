"""vCPU state as plain data (bytes/ints/dicts): read from and written into a vCPU.

Each register block is kept as the kernel struct's bytes, so capture/restore is lossless and the
stream codec needs no knowledge of x86. Restore validates every size before touching the vCPU:
the state may come from an untrusted migration stream.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field

from kvmpy.errors import IoctlError, StateError
from kvmpy.ioctl import Vcpu
from kvmpy.ioctl._kvm import ffi, lib
from kvmpy.state import versioned

log = logging.getLogger(__name__)

STATE_VERSION = 2
MAX_NESTED_BYTES = 1 << 20
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
_INT_TYPES = frozenset({int, bool})   # what isinstance(x, int) accepts, but for IntEnums
MAX_MSRS = 4096


@versioned("kvm-vcpu", STATE_VERSION)
@dataclass
class VcpuState:
    """One vCPU's architectural state. `lapic` is None without an in-kernel irqchip; `nested`
    holds KVM_GET_NESTED_STATE's bytes where KVM supports nesting (None elsewhere)."""
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
    nested: bytes | None = None
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
        if self.nested is not None and (not isinstance(self.nested, bytes) or not
                                        ffi.sizeof("struct kvm_nested_state") <= len(self.nested) <= MAX_NESTED_BYTES):
            raise StateError("validating vCPU state", detail="nested state block has a bad size")
        msrs = self.msrs
        if not isinstance(msrs, dict) or len(msrs) > MAX_MSRS:
            raise StateError("validating vCPU state", detail="msrs must be a dict of at most 4096 entries")
        # the whole table at C speed first (a switchover validates every vCPU's under nested TCG);
        # the loop below runs only to name the bad entry
        if not msrs or (set(map(type, msrs)) <= _INT_TYPES and set(map(type, msrs.values())) <= _INT_TYPES
                        and min(msrs) >= 0 and max(msrs) < 1 << 32
                        and min(msrs.values()) >= 0 and max(msrs.values()) < 1 << 64):
            return
        for index, value in msrs.items():
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


def get_vcpu_state(vcpu: Vcpu, msr_indices: list[int] | None = None) -> VcpuState:
    """Snapshot a (stopped or parked) vCPU: every block KVM has, every MSR KVM lists as saved
    (msr_indices default: KVM_GET_MSR_INDEX_LIST), and the nested state where supported."""
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
        debugregs=_blob(vcpu.get_debugregs()), lapic=lapic, msrs=read_msrs(vcpu, msr_indices),
        nested=_nested_state(vcpu))


def _nested_state(vcpu: Vcpu) -> bytes | None:
    size = vcpu.vm.check_extension(lib.KVM_CAP_NESTED_STATE)
    return vcpu.get_nested_state(size) if size > 0 else None


def _cdata(ctype: str, data: bytes):
    out = ffi.new(ctype + " *")
    ffi.memmove(out, data, len(data))
    return out


NESTED_GUEST_MODE, NESTED_GIF_SET = 0x1, 0x100      # struct kvm_nested_state's flags
NESTED_FORMAT_SVM = 1
EFER_SVME = 1 << 12


def loadable_nested_state(nested: bytes, efer: int) -> bytes:
    """The nested state as KVM_SET_NESTED_STATE takes it. On SVM, a vCPU outside guest mode with
    EFER.SVME clear can only have GIF set (only CLGI clears it, and CLGI needs SVME), and KVM
    refuses anything else with EINVAL. A source in L1 captured GIF clear for a guest that never
    touched SVM (with vGIF, KVM reads GIF from the VMCB, which nested SVM under QEMU's TCG
    seems to clobber), and the destination then failed the migration at the switchover."""
    if len(nested) < 4:
        return nested
    flags, fmt = struct.unpack_from("<HH", nested)
    if fmt == NESTED_FORMAT_SVM and not efer & EFER_SVME and not flags & NESTED_GUEST_MODE \
            and flags != NESTED_GIF_SET:
        log.info("nested state flags %#x outside guest mode with SVME clear: loaded as GIF set", flags)
        return struct.pack("<H", NESTED_GIF_SET) + nested[2:]
    return nested


def set_vcpu_state(vcpu: Vcpu, state: VcpuState, validated: bool = False) -> None:
    """Load `state` into `vcpu` (validated first), in the order KVM needs: registers, extended
    state, special registers, nested state, MSRs, then run state, LAPIC and pending events.
    `validated`: the caller already ran state.validate(xsave_bytes=vcpu.xsave_bytes), as the
    board's restore does for every vCPU before the first changes."""
    if not isinstance(state, VcpuState):
        raise StateError("restoring vCPU state", detail=f"expected VcpuState, got {type(state).__name__}")
    if not validated:
        state.validate(xsave_bytes=vcpu.xsave_bytes)
    if state.nested is not None and vcpu.vm.check_extension(lib.KVM_CAP_NESTED_STATE) <= 0:
        raise StateError("restoring vCPU state", detail="the vCPU has nested state but this KVM cannot load it")
    vcpu.set_regs(_cdata("struct kvm_regs", state.regs))
    vcpu.set_fpu(_cdata("struct kvm_fpu", state.fpu))
    xsave = ffi.new("struct kvm_xsave *", {"extra": (len(state.xsave) - ffi.sizeof("struct kvm_xsave")) // 4})
    ffi.memmove(xsave, state.xsave, len(state.xsave))
    vcpu.set_xsave(xsave)
    vcpu.set_xcrs(_cdata("struct kvm_xcrs", state.xcrs))
    vcpu.set_sregs(_cdata("struct kvm_sregs", state.sregs))
    if state.nested is not None:
        efer = ffi.cast("struct kvm_sregs *", ffi.from_buffer(state.sregs)).efer
        vcpu.set_nested_state(loadable_nested_state(state.nested, efer))
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
