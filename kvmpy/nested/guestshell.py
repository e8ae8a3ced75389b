"""`make run`: kvmpy's main job as a person meets it — the stock Debian kernel booted by kvmpy
to an interactive shell on this terminal. Directly on a host with hardware virtualization;
inside the nested harness (L1) where the host KVM is PVM; a clear refusal where there is none."""
from __future__ import annotations

import os
import shlex
import sys

from kvmpy.errors import NestedError
from kvmpy.cli.info import host_kvm_kind
from kvmpy.nested import tier2
from kvmpy.nested.images import build_guest_initramfs
from kvmpy.nested.kernel import unpack

GREETING_SCRIPT = """\
echo
echo "kvmpy: Debian $(uname -r) guest, $(grep -c ^processor /proc/cpuinfo) CPU(s), $(free -m | awk '/Mem:/{print $2}') MiB."
echo "kvmpy: 'poweroff -f' ends the run; Ctrl-A x quits kvmpy at once, Ctrl-A h lists the keys."
setsid cttyhack sh
poweroff -f
"""


def guest_argv(smp: int = 2, memory: str = "1G") -> list[str]:
    """The `kvmpy boot` command line for the stock kernel with a shell-running initramfs."""
    kernel = unpack()
    initrd = build_guest_initramfs(kernel)
    append = f"console=ttyS0 panic=-1 quiet {tier2.test_script_arg(GREETING_SCRIPT)}"
    return [sys.executable, "-m", "kvmpy", "boot", "--kernel", str(kernel.bzimage), "--initrd", str(initrd),
            "--append", append, "--serial", "stdio", "--no-reboot", "-m", memory, "--smp", str(smp),
            "--rng"]


def main(smp: int = 2, memory: str = "1G") -> int:
    kind = host_kvm_kind()
    argv = guest_argv(smp, memory)
    if kind == "hardware" or os.environ.get("KVMPY_IN_NESTED") == "1":
        os.execv(argv[0], argv)
    if kind == "pvm":
        from kvmpy.nested.harness import HarnessConfig, L1Harness
        print("kvmpy: this host's KVM is PVM: booting the guest inside the nested hardware-KVM "
              "harness (L1 first, then the guest; about a minute)", file=sys.stderr)
        return L1Harness(HarnessConfig()).shell(command=shlex.join(argv))
    raise NestedError("booting a guest", detail="no usable /dev/kvm on this host (kvmpy info says why)")
