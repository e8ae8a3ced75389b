"""MachineConfig: everything a Machine is built from, as plain checked data (CLI or Python API)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

from kvmpy.devices.virtio.drive import DriveSpec, parse_drive_spec
from kvmpy.errors import ConfigError
from kvmpy.memslots import parse_size

MAX_VCPUS = 64


@dataclass
class MachineConfig:
    kernel: str
    initrd: str | None = None
    cmdline: str = ""
    memory: int = 512 << 20
    smp: int = 1
    serial: str = "stdio"
    no_reboot: bool = False
    device: str = "/dev/kvm"
    drives: list[DriveSpec] = field(default_factory=list)
    rng: bool = False
    virtio_console: str | None = None
    timeout: float = 0.0
    force: bool = False
    stats: bool = False
    mem_backend: str = "auto"
    acpi: bool = True
    tsc_deadline: bool = False

    def validate(self) -> None:
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not os.path.isfile(path):
                raise ConfigError(f"checking the {what}", detail=f"{path}: no such file")
        if not 1 <= self.smp <= MAX_VCPUS:
            raise ConfigError("checking --smp", detail=f"{self.smp} is not in 1..{MAX_VCPUS}")
        if self.memory < (16 << 20) or self.memory % 4096:
            raise ConfigError("checking --memory", detail="need at least 16 MiB, a multiple of 4 KiB")
        if self.timeout < 0:
            raise ConfigError("checking --timeout", detail="must not be negative")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MachineConfig":
        cfg = cls(kernel=args.kernel, initrd=args.initrd, cmdline=args.append or "",
                  memory=parse_size(args.memory), smp=args.smp, serial=args.serial,
                  no_reboot=args.no_reboot, device=args.device,
                  drives=[parse_drive_spec(d) for d in args.drive], rng=args.rng,
                  virtio_console=args.virtio_console, timeout=args.timeout, force=args.force,
                  stats=getattr(args, "stats", False),
                  mem_backend=getattr(args, "mem_backend", "auto"), acpi=getattr(args, "acpi", True),
                  tsc_deadline=getattr(args, "tsc_deadline", False))
        cfg.validate()
        return cfg
