"""Arguments of `kvmpy boot`, in the spirit of QEMU's flags (kept apart so the parser builds
without importing the machine)."""
from __future__ import annotations

import argparse


def add_boot_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", help="bzImage, ELF vmlinux with a PVH note, or multiboot image "
                                    "(required unless --incoming restores a guest)")
    p.add_argument("--initrd", help="initial ramdisk; for a multiboot kernel several modules as QEMU "
                                    "takes them: 'a.bin args,b.bin' (',,' is a literal comma)")
    p.add_argument("--append", default="", help="kernel command line")
    p.add_argument("-m", "--memory", default="512M", help="guest RAM, e.g. 512M, 2G (default 512M)")
    p.add_argument("--smp", type=int, default=1, help="number of vCPUs")
    p.add_argument("--serial", default="stdio",
                   help="COM1 backend: stdio, file:PATH, unix:PATH (socket), null")
    p.add_argument("--no-reboot", action="store_true", help="exit instead of restarting on guest reboot")
    p.add_argument("--device", action="append", default=[], metavar="DEVICE",
                   help="a QEMU device: isa-debug-exit[,iobase=PORT][,iosize=N] (repeatable; replaces "
                        "kvmpy's debug-exit at 0x501); a path with '/' names the KVM device node "
                        "instead (default /dev/kvm)")
    p.add_argument("--force", action="store_true",
                   help="boot even when the host KVM is PVM and the kernel is not PVM-aware")
    p.add_argument("--drive", action="append", default=[],
                   metavar="file=IMG[,readonly=on][,serial=ID][,cache=none]",
                   help="a virtio-blk disk (repeatable); a comma inside a value is written ',,' as in QEMU")
    p.add_argument("--fw-cfg", action="append", default=[], metavar="name=opt/NAME,file=PATH|string=TEXT",
                   help="a file for QEMU's fw_cfg device (ports 0x510/0x511, DMA at 0x514), as QEMU's "
                        "-fw_cfg (repeatable)")
    p.add_argument("--rng", action="store_true", help="a virtio-rng device fed from getrandom")
    p.add_argument("--nic", action="append", default=[],
                   metavar="tap[,ifname=NAME][,br=BRIDGE][,mac=MAC][,vhost=on|off|auto][,queues=N]",
                   help="a virtio-net card on a TAP (repeatable; QEMU's -nic shorthand): kvmpy creates "
                        "the TAP unless ifname names an existing one, puts it on bridge br, and uses "
                        "vhost-net when it can (vhost=auto)")
    p.add_argument("--virtio-console", metavar="SPEC",
                   help="a virtio console (hvc0) backend: stdio, file:PATH, unix:PATH, null")
    p.add_argument("--timeout", type=float, default=0.0,
                   help="stop after this many seconds, counted from start-up (exit status 124); "
                        "0, the default, means no limit")
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
    p.add_argument("-S", "--paused", action="store_true",
                   help="build the machine but keep its vCPUs parked until resumed (QEMU's -S; "
                        "QMP cont)")
    p.add_argument("--incoming", metavar="URI",
                   help="restore a saved or migrated guest instead of booting a kernel: file:PATH, "
                        "exec:COMMAND (its stdout), or defer (wait for QMP migrate-incoming); give "
                        "the same device flags as the source")
    p.add_argument("--name", help="the guest's name (QMP query-name)")
    p.add_argument("--sandbox", metavar="on|off[,obsolete=..][,elevateprivileges=..][,spawn=..][,resourcecontrol=..]",
                   help="seccomp filters per thread kind once the machine is set up (QEMU's -sandbox; "
                        "default: on where the kernel supports it)")
    p.add_argument("--runas", metavar="USER",
                   help="drop to USER's uid, gid and groups once /dev/kvm, images, TAPs and sockets "
                        "are open (needs root; a guest reboot then ends kvmpy)")
    p.add_argument("--chroot", metavar="DIR",
                   help="chroot into DIR once everything is open, before --runas (needs root)")
    p.add_argument("--qmp", action="append", default=[], metavar="SPEC",
                   help="a QMP monitor: unix:PATH,server=on,wait=off or tcp:HOST:PORT,server=on,"
                        "wait=off (repeatable; wait=on holds the guest until a client connects)")
