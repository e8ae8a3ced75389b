"""`kvmpy info`: what this host's KVM offers and what that means for running guests."""
from __future__ import annotations

import argparse
import os
import sys

from kvmpy.errors import KvmUnavailableError
from kvmpy.ioctl import Kvm, lib

# capabilities kvmpy relies on: (label, KVM_CAP_* value, checked on the VM fd)
CAPABILITIES: list[tuple[str, int, bool]] = [
    ("user_memory", lib.KVM_CAP_USER_MEMORY, False),
    ("irqchip", lib.KVM_CAP_IRQCHIP, False),
    ("pit2", lib.KVM_CAP_PIT2, False),
    ("set_tss_addr", lib.KVM_CAP_SET_TSS_ADDR, False),
    ("set_identity_map_addr", lib.KVM_CAP_SET_IDENTITY_MAP_ADDR, False),
    ("ioeventfd", lib.KVM_CAP_IOEVENTFD, False),
    ("irqfd", lib.KVM_CAP_IRQFD, False),
    ("irqfd_resample", lib.KVM_CAP_IRQFD_RESAMPLE, False),
    ("irq_routing", lib.KVM_CAP_IRQ_ROUTING, False),
    ("signal_msi", lib.KVM_CAP_SIGNAL_MSI, False),
    ("xsave", lib.KVM_CAP_XSAVE, False),
    ("xsave2_bytes", lib.KVM_CAP_XSAVE2, True),
    ("xcrs", lib.KVM_CAP_XCRS, False),
    ("vcpu_events", lib.KVM_CAP_VCPU_EVENTS, False),
    ("debugregs", lib.KVM_CAP_DEBUGREGS, False),
    ("mp_state", lib.KVM_CAP_MP_STATE, False),
    ("adjust_clock", lib.KVM_CAP_ADJUST_CLOCK, False),
    ("immediate_exit", lib.KVM_CAP_IMMEDIATE_EXIT, False),
    ("manual_dirty_log_protect2", lib.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, False),
    ("dirty_log_ring", lib.KVM_CAP_DIRTY_LOG_RING, True),
    ("dirty_log_ring_acq_rel", lib.KVM_CAP_DIRTY_LOG_RING_ACQ_REL, True),
    ("tsc_control", lib.KVM_CAP_TSC_CONTROL, False),
    ("nr_vcpus", lib.KVM_CAP_NR_VCPUS, False),
    ("max_vcpus", lib.KVM_CAP_MAX_VCPUS, False),
    ("nr_memslots", lib.KVM_CAP_NR_MEMSLOTS, False),
]


def cpu_virt_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """Which of vmx/svm the host CPU advertises."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return {"vmx", "svm"} & set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def host_kvm_kind(device: str = "/dev/kvm", sys_module: str = "/sys/module") -> str:
    """"hardware" (vmx/svm KVM), "pvm" (software PVM KVM: no stock Linux guests) or "none"."""
    if not os.path.exists(device):
        return "none"
    if os.path.isdir(os.path.join(sys_module, "kvm_pvm")) and not cpu_virt_flags():
        return "pvm"
    if cpu_virt_flags():
        return "hardware"
    return "pvm" if os.path.isdir(os.path.join(sys_module, "kvm_pvm")) else "none"


def meaning(kind: str, vhost: bool) -> list[str]:
    lines = []
    if kind == "pvm":
        lines.append("KVM here is PVM (software nested KVM, about 1M guest instructions/s): tiny test "
                     "guests run, but stock Linux kernels cannot boot on this host's KVM; use the "
                     "nested harness: make nested-run / make test-tier2")
    elif kind == "hardware":
        lines.append("hardware-assisted KVM: stock Linux guests can boot directly (kvmpy boot)")
    else:
        lines.append("no usable KVM: only tier-0 tests can run here")
    if not vhost:
        lines.append("no /dev/vhost-net: the vhost-net offload cannot be used on this host")
    return lines


def collect(device: str) -> dict:
    """Every fact `kvmpy info` prints; raises KvmUnavailableError without access to KVM."""
    with Kvm(device) as kvm:
        facts: dict = {"device": device, "api_version": kvm.api_version(),
                       "vcpu_mmap_size": kvm.vcpu_mmap_size(), "capabilities": {}}
        with kvm.create_vm() as vm:
            for label, cap, on_vm in CAPABILITIES:
                facts["capabilities"][label] = (vm if on_vm else kvm).check_extension(cap)
        facts["msr_count"] = len(kvm.msr_index_list())
        facts["cpuid_entries"] = kvm.supported_cpuid().nent
    kind = host_kvm_kind(device)
    facts.update(kind=kind, cpu_virt_flags=sorted(cpu_virt_flags()),
                 kvm_pvm_module=os.path.isdir("/sys/module/kvm_pvm"),
                 vhost_net=os.path.exists("/dev/vhost-net"), tun=os.path.exists("/dev/net/tun"))
    facts["meaning"] = meaning(kind, facts["vhost_net"])
    return facts


def main(args: argparse.Namespace) -> int:
    try:
        facts = collect(args.device)
    except KvmUnavailableError as e:
        print(f"kvmpy: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        import json  # only `kvmpy info --json` needs it; `kvmpy boot` imports this module too
        print(json.dumps(facts, indent=2, sort_keys=True))
        return 0
    print(f"KVM device      {facts['device']} (API version {facts['api_version']})")
    print(f"KVM kind        {facts['kind']}  (cpu flags: {', '.join(facts['cpu_virt_flags']) or 'no vmx/svm'}; "
          f"kvm_pvm module: {'yes' if facts['kvm_pvm_module'] else 'no'})")
    print(f"vhost-net       {'present' if facts['vhost_net'] else 'missing'};  /dev/net/tun "
          f"{'present' if facts['tun'] else 'missing'}")
    print(f"MSRs saved      {facts['msr_count']};  CPUID leaves {facts['cpuid_entries']}")
    print("capabilities:")
    for label, value in facts["capabilities"].items():
        shown = "no" if value == 0 else ("yes" if value == 1 else str(value))
        print(f"  {label:28s} {shown}")
    print("what this means:")
    for line in facts["meaning"]:
        print(f"  - {line}")
    return 0
