"""The guest's CPUID, built from what KVM supports (KVM_GET_SUPPORTED_CPUID) for vCPU i of N.

Pure data in, data out. The topology we present is one socket of N single-threaded cores with
APIC id = vCPU index; every leaf that describes topology (1, 4, 0xB, 0x1F, 0x8000001D/1E,
0x80000008) is rewritten to agree with it, like Firecracker's CPUID normalisation. The PMU
(leaf 0xA) is hidden: we do not virtualise performance counters.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Mapping

from kvmpy.errors import BootError

KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1      # spelled as in <linux/kvm.h>
MAX_APIC_ID = 0xFF

LEAF_VENDOR, LEAF_FEATURES, LEAF_CACHE, LEAF_PMU = 0x0, 0x1, 0x4, 0xA
LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2 = 0xB, 0x1F
LEAF_KVM_SIGNATURE, LEAF_KVM_FEATURES = 0x40000000, 0x40000001
LEAF_EXT_FEATURES, LEAF_EXT_ADDR_SIZES = 0x80000001, 0x80000008
LEAF_AMD_CACHE, LEAF_AMD_TOPOLOGY = 0x8000001D, 0x8000001E

ECX_HYPERVISOR = 1 << 31
ECX_TSC_DEADLINE = 1 << 24               # KVM emulates it (KVM_CAP_TSC_DEADLINE_TIMER) but leaves it to us
ECX_OSXSAVE = 1 << 27                    # KVM keeps this in sync with CR4 itself
EDX_HTT = 1 << 28
AMD_ECX_CMP_LEGACY = 1 << 1
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
TOPO_LEVEL_SMT, TOPO_LEVEL_CORE = 1, 2

# KVM paravirt features we pass through when KVM supports them. Left out: MMU_OP (2, obsolete),
# MSI_EXT_DEST_ID (15), HC_MAP_GPA_RANGE (16) and MIGRATION_CONTROL (17), which need VMM support.
KVM_FEATURE_CLOCKSOURCE = 1 << 0
KVM_FEATURE_CLOCKSOURCE2 = 1 << 3
KVM_FEATURES_ALLOWED = (KVM_FEATURE_CLOCKSOURCE | 1 << 1 | KVM_FEATURE_CLOCKSOURCE2 | 1 << 4 | 1 << 5
                        | 1 << 6 | 1 << 7 | 1 << 9 | 1 << 10 | 1 << 11 | 1 << 12 | 1 << 13 | 1 << 14
                        | 1 << 24)

AMD_VENDORS = (b"AuthenticAMD", b"HygonGenuine")


@dataclass(frozen=True)
class CpuidEntry:
    """One struct kvm_cpuid_entry2, as plain data."""
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @classmethod
    def from_any(cls, obj: Any) -> "CpuidEntry":
        """From a dict, a dataclass or a cffi kvm_cpuid_entry2 (anything with those names)."""
        get = obj.get if isinstance(obj, Mapping) else (lambda k, d=0: getattr(obj, k, d))
        return cls(*(int(get(k, 0)) & 0xFFFFFFFF for k in ("function", "index", "flags",
                                                             "eax", "ebx", "ecx", "edx")))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _bits_for(count: int) -> int:
    """Width of an APIC-id field that can number `count` things (ceil(log2(count)))."""
    return max(count - 1, 0).bit_length()


def _vendor(entries: list[CpuidEntry]) -> bytes:
    leaf0 = next((e for e in entries if e.function == LEAF_VENDOR), None)
    if leaf0 is None:
        return b""
    return b"".join(r.to_bytes(4, "little") for r in (leaf0.ebx, leaf0.edx, leaf0.ecx))


def _topology_leaf(function: int, vcpu: int, num_cpus: int) -> list[CpuidEntry]:
    """Leaf 0xB/0x1F subleaves: SMT level (1 thread per core), core level (N cores), end."""
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [CpuidEntry(function, 0, flags, eax=0, ebx=1, ecx=0 | TOPO_LEVEL_SMT << 8, edx=vcpu),
            CpuidEntry(function, 1, flags, eax=_bits_for(num_cpus), ebx=num_cpus,
                       ecx=1 | TOPO_LEVEL_CORE << 8, edx=vcpu),
            CpuidEntry(function, 2, flags, eax=0, ebx=0, ecx=2, edx=vcpu)]


def _cache_sharing(eax: int, num_cpus: int) -> int:
    """Rewrite a leaf 4 / 0x8000001D EAX: L1/L2 per core, L3+ shared by the whole package."""
    level = (eax >> 5) & 0x7
    sharing = (1 << _bits_for(num_cpus)) if level >= 3 else 1
    return (eax & ~(0xFFF << 14)) | ((sharing - 1) & 0xFFF) << 14


def _normalise(e: CpuidEntry, vcpu: int, num_cpus: int, amd: bool, tsc_deadline: bool) -> CpuidEntry:
    id_span = 1 << _bits_for(num_cpus)
    if e.function == LEAF_FEATURES:
        ebx = (e.ebx & 0x0000FFFF) | (min(id_span, 0xFF) << 16) | (vcpu << 24)
        edx = (e.edx | EDX_HTT) if num_cpus > 1 else (e.edx & ~EDX_HTT)
        ecx = (e.ecx | ECX_HYPERVISOR) & ~ECX_OSXSAVE
        ecx = (ecx | ECX_TSC_DEADLINE) if tsc_deadline else (ecx & ~ECX_TSC_DEADLINE)
        return replace(e, ebx=ebx, ecx=ecx, edx=edx)
    if e.function == LEAF_CACHE and not amd:
        if e.eax & 0x1F == 0:           # cache type 0: no more caches
            return e
        eax = _cache_sharing(e.eax, num_cpus)
        return replace(e, eax=(eax & 0x03FFFFFF) | (min(id_span, 64) - 1) << 26)
    if e.function == LEAF_PMU:
        return replace(e, eax=0, ebx=0, ecx=0, edx=0)
    if e.function == LEAF_EXT_FEATURES and amd:
        ecx = (e.ecx | AMD_ECX_CMP_LEGACY) if num_cpus > 1 else (e.ecx & ~AMD_ECX_CMP_LEGACY)
        return replace(e, ecx=ecx)
    if e.function == LEAF_EXT_ADDR_SIZES and amd:
        return replace(e, ecx=(e.ecx & ~0xF0FF) | _bits_for(num_cpus) << 12 | (num_cpus - 1))
    if e.function == LEAF_AMD_CACHE and amd and e.eax & 0x1F:
        return replace(e, eax=_cache_sharing(e.eax, num_cpus))
    if e.function == LEAF_AMD_TOPOLOGY and amd:
        return replace(e, eax=vcpu, ebx=vcpu & 0xFF, ecx=0, edx=0)
    return e


def kvm_leaves(host: list[CpuidEntry]) -> list[CpuidEntry]:
    """The KVM signature leaf and the paravirt feature leaf (features masked to what KVM offers)."""
    sig = [int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in (0, 4, 8)]
    offered = next((e.eax for e in host if e.function == LEAF_KVM_FEATURES), 0)
    return [CpuidEntry(LEAF_KVM_SIGNATURE, 0, 0, LEAF_KVM_FEATURES, *sig),
            CpuidEntry(LEAF_KVM_FEATURES, 0, 0, eax=offered & KVM_FEATURES_ALLOWED)]


def guest_cpuid(host_entries: Iterable[Any], vcpu_index: int, num_cpus: int,
                tsc_deadline: bool = False) -> list[CpuidEntry]:
    """CPUID entries for vCPU `vcpu_index` of `num_cpus`, from KVM_GET_SUPPORTED_CPUID's entries
    (dicts, dataclasses or cffi structs with function/index/flags/eax/ebx/ecx/edx).

    `tsc_deadline`: KVM has KVM_CAP_TSC_DEADLINE_TIMER. Advertising it lets Linux skip the LAPIC
    timer calibration (a 100 ms busy loop that nested virtualization stretches) and program
    timers with one MSR write; KVM never reports it in GET_SUPPORTED_CPUID."""
    if not 1 <= num_cpus <= MAX_APIC_ID or not 0 <= vcpu_index < num_cpus:
        raise BootError("building guest CPUID",
                        detail=f"vCPU {vcpu_index} of {num_cpus}: need 0 <= index < count <= {MAX_APIC_ID}")
    host = [CpuidEntry.from_any(e) for e in host_entries]
    if not any(e.function == LEAF_FEATURES for e in host):
        raise BootError("building guest CPUID", detail="the host's supported CPUID has no leaf 1")
    amd = _vendor(host) in AMD_VENDORS
    out: dict[tuple[int, int], CpuidEntry] = {}
    for e in host:
        if e.function in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2, LEAF_KVM_SIGNATURE, LEAF_KVM_FEATURES):
            continue
        out[(e.function, e.index)] = _normalise(e, vcpu_index, num_cpus, amd, tsc_deadline)
    for leaf in (LEAF_TOPOLOGY, LEAF_TOPOLOGY_V2):
        if any(e.function == leaf for e in host):
            out.update({(e.function, e.index): e for e in _topology_leaf(leaf, vcpu_index, num_cpus)})
    out.update({(e.function, e.index): e for e in kvm_leaves(host)})
    return [out[k] for k in sorted(out)]
