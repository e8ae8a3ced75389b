"""MSR values a vCPU should hold at boot, as a firmware would leave them.

KVM resets most MSRs to architectural defaults, but a few are normally set by the BIOS and
kernels assume them: fast strings on, MTRRs enabled with write-back as the default type (without
that Linux maps all RAM uncached), and the power-on PAT. SYSCALL/SYSENTER MSRs start at zero.
"""
from __future__ import annotations

MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_IA32_CR_PAT = 0x277
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

MISC_ENABLE_FAST_STRING = 1 << 0
MTRR_ENABLE = 1 << 11
MTRR_TYPE_WRBACK = 6
PAT_POWER_ON = 0x0007040600070406   # WB, WT, UC-, UC repeated: the architectural reset value


def boot_msrs() -> dict[int, int]:
    """{MSR index: value} to write to every vCPU before it first runs."""
    return {
        MSR_IA32_SYSENTER_CS: 0,
        MSR_IA32_SYSENTER_ESP: 0,
        MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0,
        MSR_LSTAR: 0,
        MSR_CSTAR: 0,
        MSR_SYSCALL_MASK: 0,
        MSR_KERNEL_GS_BASE: 0,
        MSR_IA32_MISC_ENABLE: MISC_ENABLE_FAST_STRING,
        MSR_MTRR_DEF_TYPE: MTRR_ENABLE | MTRR_TYPE_WRBACK,
        MSR_IA32_CR_PAT: PAT_POWER_ON,
    }
