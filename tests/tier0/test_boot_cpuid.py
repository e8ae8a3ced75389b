"""Guest CPUID from KVM's supported entries: topology, hypervisor leaves, PMU hidden."""
from types import SimpleNamespace

import pytest

from kvmpy.boot import CpuidEntry, guest_cpuid
from kvmpy.errors import BootError


def regs(s: bytes) -> list[int]:
    return [int.from_bytes(s[i:i + 4], "little") for i in range(0, len(s), 4)]


def intel_host():
    b, c, d = regs(b"Genu"), regs(b"ntel"), regs(b"ineI")
    return [
        dict(function=0, index=0, flags=0, eax=0x1F, ebx=b[0], ecx=c[0], edx=d[0]),
        dict(function=1, index=0, flags=0, eax=0x906EA, ebx=0x00100800, ecx=0xF7FA3223 | (1 << 27), edx=0x0F8BFBFF),
        *[dict(function=4, index=i, flags=1, eax=eax, ebx=0x1C0003F, ecx=0x3F, edx=0)
          for i, eax in enumerate([0x1C004121, 0x1C004122, 0x1C004143, 0x1C03C163, 0])],
        dict(function=0xA, index=0, flags=0, eax=0x07300404, ebx=0, ecx=0, edx=0x603),
        *[dict(function=0xB, index=i, flags=1, eax=1, ebx=2, ecx=0x100 | i, edx=7) for i in range(2)],
        dict(function=0x1F, index=0, flags=1, eax=1, ebx=2, ecx=0x100, edx=7),
        dict(function=0x40000000, index=0, flags=0, eax=0x40000001, ebx=0, ecx=0, edx=0),
        dict(function=0x40000001, index=0, flags=0, eax=0x01FFFFFF, ebx=0, ecx=0, edx=0),
        dict(function=0x80000000, index=0, flags=0, eax=0x80000008, ebx=0, ecx=0, edx=0),
        dict(function=0x80000008, index=0, flags=0, eax=0x3027, ebx=0, ecx=0, edx=0),
    ]


def amd_host():
    b, c, d = regs(b"Auth"), regs(b"cAMD"), regs(b"enti")
    return [
        dict(function=0, index=0, eax=0x10, ebx=b[0], ecx=c[0], edx=d[0]),
        dict(function=1, index=0, eax=0x800F12, ebx=0x00200800, ecx=0x7ED8320B, edx=0x178BFBFF),
        dict(function=0x80000001, index=0, ecx=0x35C233FF),
        dict(function=0x80000008, index=0, eax=0x3030, ecx=0x700F),
        dict(function=0x8000001D, index=0, flags=1, eax=0x121), dict(function=0x8000001D, index=3, flags=1, eax=0x163),
        dict(function=0x8000001E, index=0, eax=5, ebx=0x105, ecx=0x300),
    ]


def leaf(entries, function, index=0):
    return next(e for e in entries if e.function == function and e.index == index)


@pytest.mark.parametrize("ncpus", [1, 2, 4, 6])
def test_intel_topology(ncpus):
    for vcpu in range(ncpus):
        out = guest_cpuid(intel_host(), vcpu, ncpus)
        l1 = leaf(out, 1)
        assert l1.ebx >> 24 == vcpu                                   # initial APIC id
        assert (l1.ebx >> 16) & 0xFF >= ncpus                         # addressable logical ids
        assert l1.ebx & 0xFFFF == 0x0800                              # CLFLUSH size kept
        assert bool(l1.edx & (1 << 28)) == (ncpus > 1)                # HTT
        assert l1.ecx & (1 << 31) and not l1.ecx & (1 << 27)          # hypervisor on, OSXSAVE left to KVM
        for fn in (0xB, 0x1F):
            smt, core, end = leaf(out, fn, 0), leaf(out, fn, 1), leaf(out, fn, 2)
            assert smt.edx == core.edx == end.edx == vcpu             # x2APIC id
            assert (smt.ebx, (smt.ecx >> 8) & 0xFF) == (1, 1)
            assert (core.ebx, (core.ecx >> 8) & 0xFF, core.ecx & 0xFF) == (ncpus, 2, 1)
            assert (1 << core.eax) >= ncpus and (1 << (core.eax - 1) if core.eax else 0) < ncpus
            assert (end.ecx >> 8) & 0xFF == 0 and end.ebx == 0
        caches = [e for e in out if e.function == 4 and e.eax & 0x1F]
        assert all((e.eax >> 26) + 1 >= ncpus for e in caches)       # cores per package
        l3 = next(e for e in caches if (e.eax >> 5) & 7 == 3)
        assert ((l3.eax >> 14) & 0xFFF) + 1 >= ncpus                  # L3 shared by all
        assert all((e.eax >> 14) & 0xFFF == 0 for e in caches if (e.eax >> 5) & 7 < 3)


def test_pmu_hidden_and_kvm_leaves():
    out = guest_cpuid(intel_host(), 0, 1)
    pmu = leaf(out, 0xA)
    assert (pmu.eax, pmu.ebx, pmu.ecx, pmu.edx) == (0, 0, 0, 0)
    sig = leaf(out, 0x40000000)
    assert sig.eax == 0x40000001
    assert b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx)) == b"KVMKVMKVM\0\0\0"
    feats = leaf(out, 0x40000001).eax
    assert feats & (1 << 3) and feats & 1 and feats & (1 << 24)     # clocksource, clocksource2, stable bit
    assert not feats & ((1 << 15) | (1 << 16) | (1 << 17) | (1 << 2))
    assert leaf(out, 0x80000008).eax == 0x3027                         # untouched leaves pass through
    keys = [(e.function, e.index) for e in out]
    assert keys == sorted(keys) and len(keys) == len(set(keys))


def test_kvm_features_only_as_supported():
    host = [e for e in intel_host() if e["function"] != 0x40000001]
    assert leaf(guest_cpuid(host, 0, 1), 0x40000001).eax == 0
    host.append(dict(function=0x40000001, eax=1 << 3))
    assert leaf(guest_cpuid(host, 0, 1), 0x40000001).eax == 1 << 3


def test_amd_topology():
    out = guest_cpuid(amd_host(), 3, 4)
    assert leaf(out, 0x8000001E).eax == 3 and leaf(out, 0x8000001E).ebx & 0xFF == 3
    assert (leaf(out, 0x8000001E).ebx >> 8) & 0xFF == 0               # one thread per core
    assert leaf(out, 0x80000008).ecx & 0xFF == 3 and (leaf(out, 0x80000008).ecx >> 12) & 0xF == 2
    assert leaf(out, 0x80000001).ecx & 2                              # CmpLegacy with N > 1
    assert (leaf(out, 0x8000001D, 3).eax >> 14) & 0xFFF == 3 and (leaf(out, 0x8000001D, 0).eax >> 14) & 0xFFF == 0
    assert not any(e.function == 4 for e in out)


def test_accepts_objects_and_leaves_input_alone():
    host = [SimpleNamespace(**d) for d in intel_host()]
    out = guest_cpuid(host, 1, 2)
    assert leaf(out, 1).ebx >> 24 == 1 and host[1].ebx == 0x00100800
    assert CpuidEntry.from_any(out[0]) == out[0] and out[0].as_dict()["function"] == 0


@pytest.mark.parametrize("vcpu, n", [(2, 2), (-1, 1), (0, 0), (0, 256)])
def test_bad_topology_rejected(vcpu, n):
    with pytest.raises(BootError):
        guest_cpuid(intel_host(), vcpu, n)


def test_host_without_leaf1_rejected():
    with pytest.raises(BootError, match="leaf 1"):
        guest_cpuid([dict(function=0, eax=0)], 0, 1)


@pytest.mark.parametrize("host", [intel_host, amd_host])
def test_tsc_deadline_follows_the_kvm_capability(host):
    """KVM never reports TSC-deadline in GET_SUPPORTED_CPUID; it is set only when the VMM says
    KVM has KVM_CAP_TSC_DEADLINE_TIMER, and cleared otherwise even if the input had it."""
    entries = host()
    assert not leaf(guest_cpuid(entries, 0, 1), 1).ecx & (1 << 24)
    assert leaf(guest_cpuid(entries, 0, 1, tsc_deadline=True), 1).ecx & (1 << 24)
    with_bit = [dict(e, ecx=e.get("ecx", 0) | (1 << 24)) if e["function"] == 1 else e for e in entries]
    assert not leaf(guest_cpuid(with_bit, 0, 1, tsc_deadline=False), 1).ecx & (1 << 24)
    assert leaf(guest_cpuid(entries, 0, 1, tsc_deadline=True), 1).ecx & (1 << 31)  # other bits kept


def test_tsc_deadline_is_opt_in_on_the_command_line(tmp_path):
    """Off unless asked for: with it, boots under nested SVM on QEMU TCG hung now and then."""
    from kvmpy.cli import build_parser
    from kvmpy.machine.config import MachineConfig
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"x")
    parser = build_parser()
    plain = MachineConfig.from_args(parser.parse_args(["boot", "--kernel", str(kernel)]))
    asked = MachineConfig.from_args(parser.parse_args(["boot", "--kernel", str(kernel), "--tsc-deadline"]))
    assert plain.tsc_deadline is False and asked.tsc_deadline is True
