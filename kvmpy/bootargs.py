"""Arguments of `kvmpy boot`, in the spirit of QEMU's flags (kept apart so the parser builds
without importing the machine)."""
from __future__ import annotations

import argparse


def add_boot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", required=True, help="bzImage, ELF vmlinux with a PVH note, or multiboot image")
    p.add_argument("--initrd", help="initial ramdisk")
    p.add_argument("--append", default="", help="kernel command line")
    p.add_argument("-m", "--memory", default="512M", help="guest RAM, e.g. 512M, 2G (default 512M)")
    p.add_argument("--smp", type=int, default=1, help="number of vCPUs")
    p.add_argument("--serial", default="stdio",
                   help="COM1 backend: stdio, file:PATH, unix:PATH (socket), null")
    p.add_argument("--no-reboot", action="store_true", help="exit instead of restarting on guest reboot")
    p.add_argument("--device", default="/dev/kvm", help="KVM device path")
    p.add_argument("--force", action="store_true",
                   help="boot even when the host KVM is PVM and the kernel is not PVM-aware")
    p.add_argument("--drive", action="append", default=[],
                   metavar="file=IMG[,readonly=on][,serial=ID][,cache=none]",
                   help="a virtio-blk disk (repeatable)")
    p.add_argument("--rng", action="store_true", help="a virtio-rng device fed from getrandom")
    p.add_argument("--virtio-console", metavar="SPEC",
                   help="a virtio console (hvc0) backend: stdio, file:PATH, unix:PATH, null")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="stop the guest after this many seconds (exit status 124)")
    p.add_argument("--log-level", dest="boot_log_level", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity (also accepted before the subcommand)")
    p.add_argument("--stats", action="store_true",
                   help="count exits per port/MMIO address and print the busiest at the end")
    p.add_argument("--no-acpi", dest="acpi", action="store_false",
                   help="no ACPI tables or PM device: the guest uses the MP table, and its "
                        "poweroff halts the vCPUs instead of ending kvmpy")
    p.add_argument("--tsc-deadline", action="store_true",
                   help="advertise the LAPIC TSC-deadline timer (KVM emulates it) when KVM has "
                        "KVM_CAP_TSC_DEADLINE_TIMER; off by default: under nested SVM on QEMU TCG, "
                        "boots with it hung before init about once in 16")
    p.add_argument("--mem-backend", choices=["auto", "memfd", "anon"], default="auto",
                   help="guest RAM: memfd (shareable by fd) or anonymous memory; auto picks memfd "
                        "when the kernel gives shmem huge pages, else anon (huge pages matter a lot "
                        "under nested paging)")
