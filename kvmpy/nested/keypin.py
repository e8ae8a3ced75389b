"""Hold KVM's runtime static keys on for L1's whole life, so that guests starting and ending do
not make L1's kernel rewrite its own text.

Why: KVM counts users of a few static keys. Every KVM_CREATE_VM increments
`preempt_notifier_key` and every VM's end decrements it; a vCPU's in-kernel local APIC holds
`apic_sw_disabled` until the guest software-enables it (and drops it a second later);
`apic_hw_disabled` counts APICs whose base MSR has the enable bit clear; `kvm_has_noapic_vcpu`
counts vCPUs of VMs without an in-kernel irqchip. When a count goes 0 -> 1 or 1 -> 0 the kernel
rewrites every site of the key with text_poke_bp: an int3 on live text, then IPIs to resync the
other CPUs. One site of preempt_notifier_key is in __schedule (+0x2ab in Debian's 6.1.0-57),
the hottest code there is. L1 runs under QEMU TCG with one host thread per vCPU, and that
cross-modifying code has wedged it: one vCPU looping through exc_int3 at __schedule+0x2ab, the
other spinning on a runqueue lock or in __schedule too (about once per tier-2 run here; a CI run
wedged five times and failed). Tier 2 starts and ends hundreds of VMs (kvmpy's and the QEMU
reference's), each flipping these keys when it is the only one.

A process started by L1's init before any test holds one VM with an irqchip and a vCPU whose
APIC is hardware- and software-disabled, and one VM without an irqchip with a vCPU: every count
stays above zero until L1 powers off, so no test's VM flips a key. The vCPUs never run.

This file is also the script L1's init runs (`python3 -I keypin.py HELD_FILE`): standard library
only, no kvmpy import (the chroot's Python starts it before the harness's environment exists).
"""
from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys

# <linux/kvm.h>: _IO(KVMIO, nr) and _IOW(KVMIO, 0x89, struct kvm_msrs) (8-byte header)
KVM_CREATE_VM = 0xAE01
KVM_CREATE_VCPU = 0xAE41
KVM_CREATE_IRQCHIP = 0xAE60
KVM_SET_MSRS = 0x4008AE89
MSR_IA32_APICBASE = 0x1B

KEYS = ("preempt_notifier_key", "apic_sw_disabled", "apic_hw_disabled", "kvm_has_noapic_vcpu")


def _ioctl(fd: int, request: int, arg: int | bytes = 0) -> int:
    return fcntl.ioctl(fd, request, arg)  # type: ignore[return-value]


def hold_keys(kvm_path: str = "/dev/kvm") -> tuple[list[int], list[str], list[str]]:
    """Open the VMs that keep KEYS enabled; return (fds to keep open, keys held, failures).

    Each step that fails is named and the rest still tried: a key held is a key that cannot
    flip, whatever happened to the others."""
    fds: list[int] = []
    held: list[str] = []
    failures: list[str] = []

    def step(key: str, action) -> bool:
        try:
            action()
        except OSError as e:
            failures.append(f"{key}: {os.strerror(e.errno) if e.errno else e}")
            return False
        held.append(key)
        return True

    try:
        kvm = os.open(kvm_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return fds, held, [f"{kvm_path}: {os.strerror(e.errno) if e.errno else e}"]
    fds.append(kvm)
    try:
        with_apic = _ioctl(kvm, KVM_CREATE_VM, 0)
    except OSError as e:
        return fds, held, [f"KVM_CREATE_VM: {os.strerror(e.errno) if e.errno else e}"]
    fds.append(with_apic)
    held.append("preempt_notifier_key")
    vcpu: list[int] = []

    def apic_vcpu() -> None:
        _ioctl(with_apic, KVM_CREATE_IRQCHIP, 0)
        vcpu.append(_ioctl(with_apic, KVM_CREATE_VCPU, 0))
        fds.append(vcpu[0])

    if step("apic_sw_disabled", apic_vcpu):
        def disable_apic() -> None:
            # struct kvm_msrs { __u32 nmsrs, pad; struct kvm_msr_entry { __u32 index, reserved;
            # __u64 data; } entries[1]; }: APIC base 0 = the enable bit clear (xAPIC -> disabled,
            # a transition KVM accepts from the host)
            msrs = bytearray(struct.pack("<IIIIQ", 1, 0, MSR_IA32_APICBASE, 0, 0))
            if fcntl.ioctl(vcpu[0], KVM_SET_MSRS, msrs, True) != 1:
                raise OSError(0, "KVM_SET_MSRS set no MSR")
        step("apic_hw_disabled", disable_apic)

    def noapic_vcpu() -> None:
        without_apic = _ioctl(kvm, KVM_CREATE_VM, 0)
        fds.append(without_apic)
        fds.append(_ioctl(without_apic, KVM_CREATE_VCPU, 0))

    step("kvm_has_noapic_vcpu", noapic_vcpu)
    return fds, held, failures


def main(argv: list[str]) -> int:
    """Hold the keys, write HELD_FILE (what is held, a line each failure), then sleep until
    L1 powers off. Exit status 1 if nothing could be held."""
    if len(argv) != 2:
        print("usage: keypin.py HELD_FILE", file=sys.stderr)
        return 2
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    fds, held, failures = hold_keys()
    report = "held " + " ".join(held) + "".join(f"\nfailed {f}" for f in failures) + "\n"
    tmp = argv[1] + ".tmp"
    with open(tmp, "w") as f:
        f.write(report)
    os.replace(tmp, argv[1])
    if failures:
        print("kvmpy keypin: " + "; ".join(failures), file=sys.stderr, flush=True)
    if not held:
        return 1
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
