"""`kvmpy boot`: check the request against this host, build the Machine, run it, report."""
from __future__ import annotations

import argparse
import logging
import sys

from kvmpy.boot.image import read_kernel
from kvmpy.boot.loader import detect_format
from kvmpy.errors import ConfigError
from kvmpy.hostinfo import host_kvm_kind
from kvmpy.machine import Machine
from kvmpy.vmconfig import MachineConfig

log = logging.getLogger(__name__)
LINUX_BANNER = b"Linux version "

PVM_REFUSAL = ("this host's KVM is PVM (software nested KVM): a stock, non-PVM {fmt} kernel "
               "cannot boot on it and would only crawl or hang. Boot it inside the nested "
               "hardware-KVM harness instead: make nested-run CMD='python -m kvmpy boot ...' "
               "(or make run), or pass --force to try anyway")


def check_host(config: MachineConfig) -> None:
    """Refuse, with the way out, what this host's KVM cannot run."""
    kind = host_kvm_kind(config.device)
    if kind == "pvm" and not config.force:
        image = read_kernel(config.kernel)
        fmt = detect_format(image)
        if fmt == "bzimage" or (fmt == "pvh" and LINUX_BANNER in bytes(image.data)):
            raise ConfigError(f"booting {config.kernel}", detail=PVM_REFUSAL.format(fmt=fmt))


def main(args: argparse.Namespace) -> int:
    config = MachineConfig.from_args(args)
    check_host(config)
    with Machine(config) as machine:
        result = machine.run()
        if config.stats:
            print(machine.stats_report(), file=sys.stderr)
    log.info("guest ended: %s", result.reason)
    if result.status != 0:
        print(f"kvmpy: {result.reason}", file=sys.stderr)
    return result.status
