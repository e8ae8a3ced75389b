"""Boot loaders and boot-time tables: bzImage, PVH ELF and multiboot kernels, the e820 map,
MP tables, guest CPUID and boot MSRs. Pure: everything writes into a GuestMemory and returns
plain data, so it is all testable without /dev/kvm."""
from kvmpy.boot.cpuid import CpuidEntry, guest_cpuid
from kvmpy.boot.e820 import E820Entry, build_e820
from kvmpy.boot.entry import MODE_LONG64, MODE_PROTECTED32, BootEntry, SegmentDescriptor, apply_entry
from kvmpy.boot.layout import BootRegion
from kvmpy.boot.loader import detect_format, load_kernel
from kvmpy.boot.mptable import PciInterrupt, build_mptable, write_mptable
from kvmpy.boot.msrs import boot_msrs

__all__ = ["load_kernel", "detect_format", "BootEntry", "SegmentDescriptor", "apply_entry", "BootRegion",
           "MODE_LONG64", "MODE_PROTECTED32", "E820Entry", "build_e820", "PciInterrupt", "build_mptable",
           "write_mptable", "CpuidEntry", "guest_cpuid", "boot_msrs"]
