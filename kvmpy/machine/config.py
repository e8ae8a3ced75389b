"""MachineConfig: everything a Machine is built from, as plain checked data (CLI or Python API)."""
from __future__ import annotations

import argparse
import logging
import math
from dataclasses import dataclass, field

from kvmpy.devices.debug_exit import DebugExitSpec, parse_debug_exit_spec
from kvmpy.devices.fw_cfg import FwCfgSpec, check_fw_cfg_specs, parse_fw_cfg_spec
from kvmpy.devices.virtio.drive import DriveSpec, parse_drive_spec
from kvmpy.options import split_options
from kvmpy.devices.virtio.netspec import NicSpec, parse_nic_spec
from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.machine import checks
from kvmpy.memslots import parse_size

log = logging.getLogger(__name__)
MAX_VCPUS = 64


@dataclass
class MachineConfig:
    kernel: str | None
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
    name: str | None = None              # QEMU's -name (query-name)
    paused: bool = False                 # QEMU's -S: vCPUs parked until resumed (cont)
    incoming: str | None = None          # QEMU's -incoming URI: restore instead of booting
    nics: list[NicSpec] = field(default_factory=list)   # --nic tap,...: virtio-net over TAP
    debug_exits: list[DebugExitSpec] = field(default_factory=list)   # --device isa-debug-exit,...
    fw_cfg: list[FwCfgSpec] = field(default_factory=list)   # --fw-cfg name=opt/X,file=|string=
    sandbox: str | None = None           # QEMU's -sandbox on|off[,...]; None: on where the kernel can
    runas: str | None = None             # drop to this user once everything is open (kvmpy.sandbox)
    chroot: str | None = None            # chroot here once everything is open, before --runas

    def validate(self) -> None:
        """Check everything that can be checked without opening anything for writing: the whole
        configuration is refused before any output is truncated, created or bound (a failed
        start must never cost the user a file)."""
        if self.kernel is None and self.incoming is None:
            raise ConfigError("checking the kernel", detail="--kernel is needed unless --incoming restores a guest")
        if self.kernel is not None:
            checks.check_input_file("kernel", self.kernel)
        for path, _ in self.initrd_modules():
            checks.check_input_file("initrd", path, allow_empty=False)
        if not 1 <= self.smp <= MAX_VCPUS:
            raise ConfigError("checking --smp", detail=f"{self.smp} is not in 1..{MAX_VCPUS}")
        if self.memory < (16 << 20) or self.memory % 4096:
            raise ConfigError("checking --memory", detail="need at least 16 MiB, a multiple of 4 KiB")
        checks.check_host_memory(self.memory)
        if not isinstance(self.timeout, (int, float)) or not math.isfinite(self.timeout) or self.timeout < 0:
            raise ConfigError("checking --timeout",
                              detail=f"{self.timeout!r} is not a number of seconds >= 0 (0: no limit)")
        checks.check_drives([drive.file for drive in self.drives])
        check_fw_cfg_specs(self.fw_cfg)
        for spec in self.fw_cfg:
            if spec.file is not None:
                checks.check_input_file(f"--fw-cfg file of {spec.name}", spec.file)
        checks.check_consoles(self.serial, self.virtio_console)
        checks.check_outputs_apart(self.io_inputs(), checks.console_outputs(self.serial, self.virtio_console))
        from kvmpy.sandbox import confinement
        confinement(self.sandbox, self.runas, self.chroot)   # bad options, unknown user, not root

    def initrd_modules(self) -> list[tuple[str, str]]:
        """--initrd as (path, module string) pairs: one file, or several for multiboot ("a,b args")."""
        if self.initrd is None:
            return []
        from kvmpy.boot.image import initrd_modules
        try:
            return initrd_modules(self.initrd)
        except KvmpyError as e:
            raise ConfigError("checking --initrd", detail=e.detail) from None

    def io_inputs(self) -> list[tuple[str, str]]:
        """(what, path) of every file the machine reads or writes as an input: an output must be none of them."""
        inputs = [("the kernel", self.kernel)] + [("the initrd", path) for path, _ in self.initrd_modules()]
        inputs += [(f"drive {d.file!r}", d.file) for d in self.drives]
        inputs += [(f"the --fw-cfg file of {f.name}", f.file) for f in self.fw_cfg]
        if self.incoming and self.incoming.startswith("file:"):
            inputs.append(("the --incoming snapshot", self.incoming[len("file:"):]))
        return [(what, path) for what, path in inputs if path]

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MachineConfig":
        kvm_device, debug_exits = parse_device_args(args.device)
        cfg = cls(kernel=args.kernel, initrd=args.initrd, cmdline=args.append or "",
                  memory=parse_size(args.memory), smp=args.smp, serial=args.serial,
                  no_reboot=args.no_reboot, device=kvm_device, debug_exits=debug_exits,
                  fw_cfg=[parse_fw_cfg_spec(text) for text in getattr(args, "fw_cfg", None) or []],
                  drives=[parse_drive_spec(d) for d in args.drive], rng=args.rng,
                  virtio_console=args.virtio_console, timeout=args.timeout, force=args.force,
                  stats=getattr(args, "stats", False),
                  mem_backend=getattr(args, "mem_backend", "auto"), acpi=getattr(args, "acpi", True),
                  tsc_deadline=getattr(args, "tsc_deadline", False), name=getattr(args, "name", None),
                  paused=getattr(args, "paused", False), incoming=getattr(args, "incoming", None),
                  sandbox=getattr(args, "sandbox", None), runas=getattr(args, "runas", None),
                  chroot=getattr(args, "chroot", None),
                  nics=[parse_nic_spec(text, i, getattr(args, "name", None) or "kvmpy")
                        for i, text in enumerate(getattr(args, "nic", None) or [])])
        cfg.validate()
        return cfg

    @classmethod
    def from_kwargs(cls, kernel: str | None = None, *, memory: int | str = "512M", append: str = "",
                    drives: "list[str | DriveSpec] | tuple" = (), serial: str = "capture",
                    console: str | None = None, **kw: object) -> "MachineConfig":
        """The in-process API's spelling: `memory="512M"`, `append=`, `drives=["file=a.img", ...]`,
        the serial console captured by default (machine.console.expect), `console=` for hvc0;
        every other MachineConfig field by its own name."""
        size = parse_size(memory) if isinstance(memory, str) else int(memory)
        specs = [d if isinstance(d, DriveSpec) else parse_drive_spec(d) for d in drives]
        if "virtio_console" in kw and console is not None:
            raise ConfigError("configuring the machine", detail="give console= or virtio_console=, not both")
        if console is not None:
            kw["virtio_console"] = console
        unknown = set(kw) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError("configuring the machine", detail=f"unknown argument(s): {', '.join(sorted(unknown))}")
        return cls(kernel=kernel, memory=size, cmdline=append, drives=specs, serial=serial, **kw)  # type: ignore[arg-type]


QEMU_DEVICES = ("isa-debug-exit",)


def parse_device_args(values: "list[str] | str | None") -> tuple[str, list[DebugExitSpec]]:
    """`--device` values -> (the KVM device node, the QEMU devices). A QEMU device is
    `isa-debug-exit[,iobase=PORT][,iosize=N]`; a value with a '/' and no driver name is the KVM
    device node (kvmpy's older meaning of --device, kept: default /dev/kvm)."""
    if isinstance(values, str):
        values = [values]
    kvm_device, debug_exits = "/dev/kvm", []
    for text in values or []:
        driver, *options = split_options(text)
        if driver == "isa-debug-exit":
            debug_exits.append(parse_debug_exit_spec(options))
        elif "/" in driver and not options:
            kvm_device = text
        else:
            raise ConfigError("parsing --device", detail=f"{driver!r} is not a device kvmpy has; it has "
                                                         f"{', '.join(QEMU_DEVICES)} (or give the KVM device node's path)")
    return kvm_device, debug_exits
