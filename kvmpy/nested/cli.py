"""`kvmpy nested ...` (and `python -m kvmpy.nested ...`): run commands in the L1 harness.

    run [--timeout S] [--boot-timeout S] [--memory MiB] [--cpus N] [--disk IMG] [--verbose] -- CMD...
    shell [--memory MiB] [--cpus N] [--disk IMG]
    tier2 [-- PYTEST-ARGS...]
    images          build/refresh the kernel, L1 and default guest images, print their paths
    guest-shell [--smp N] [--memory SIZE]   the stock guest under kvmpy, interactive (make run)
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
from pathlib import Path
from typing import Sequence

from kvmpy.errors import KvmpyError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmpy nested",
                                description="nested hardware-KVM harness (L1 under QEMU TCG)")
    sub = p.add_subparsers(dest="action", required=True)
    for name in ("run", "shell"):
        sp = sub.add_parser(name)
        sp.add_argument("--memory", type=int, default=4096, help="L1 memory in MiB")
        sp.add_argument("--cpus", type=int, default=2, help="L1 vCPUs")
        sp.add_argument("--boot-timeout", type=float, default=180.0, help="seconds to ready")
        sp.add_argument("--disk", type=Path, default=None,
                        help="raw image attached as L1's /dev/vda (snapshot: the file is not changed)")
    run = sub.choices["run"]
    run.add_argument("--timeout", type=float, default=1500.0, help="command seconds")
    run.add_argument("--verbose", action="store_true", help="show L1's boot output too")
    run.add_argument("command", nargs=argparse.REMAINDER, help="command (after --)")
    t2 = sub.add_parser("tier2")
    t2.add_argument("pytest_args", nargs=argparse.REMAINDER)
    sub.add_parser("images")
    gs = sub.add_parser("guest-shell", help="boot the stock guest under kvmpy to a shell (make run)")
    gs.add_argument("--smp", type=int, default=2)
    gs.add_argument("--memory", default="1G")
    return p


def _strip_dashes(words: list[str]) -> list[str]:
    return words[1:] if words and words[0] == "--" else words


def _sigterm_to_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main_argv(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if args.action == "tier2":
        from kvmpy.nested.tier2driver import run_tier2
        return run_tier2(_strip_dashes(args.pytest_args))
    if args.action == "guest-shell":
        from kvmpy.nested.guestshell import main as guest_shell
        return guest_shell(args.smp, args.memory)
    if args.action == "images":
        from kvmpy.nested.images import build_guest_initramfs, build_l1_initramfs
        from kvmpy.nested.kernel import unpack
        kernel = unpack()
        print(f"bzImage       {kernel.bzimage}\nvmlinux       {kernel.vmlinux}")
        print(f"l1 initramfs  {build_l1_initramfs(kernel)}")
        print(f"guest initrd  {build_guest_initramfs(kernel)}")
        from kvmpy.nested.l0qemu import l1_qemu
        qemu = l1_qemu()
        print(f"l1 qemu       {qemu.binary} ({qemu.origin})")
        return 0
    from kvmpy.nested.harness import HarnessConfig, L1Harness
    config = HarnessConfig(memory_mib=args.memory, cpus=args.cpus,
                           boot_timeout_s=args.boot_timeout,
                           disk=args.disk.resolve() if args.disk is not None else None)
    if args.action == "shell":
        return L1Harness(config).shell()
    words = _strip_dashes(args.command)
    if not words:
        print("kvmpy nested run: give a command after --", file=sys.stderr)
        return 2
    config.command_timeout_s = args.timeout
    config.echo_boot = args.verbose
    command = words[0] if len(words) == 1 else shlex.join(words)
    result = L1Harness(config).run(command)
    print(f"nested: exit status {result.rc}; {result.timings()}", file=sys.stderr)
    if result.rc != 0:
        print(f"nested: L1 console log: {result.console_log}", file=sys.stderr)
    return result.rc


def main(args: argparse.Namespace) -> int:
    """Entry from kvmpy.cli: `args.nested_args` is the rest of argv."""
    return main_argv(args.nested_args)


def script_main(argv: Sequence[str] | None = None) -> int:
    """Entry for `python -m kvmpy.nested`: SIGTERM and Ctrl-C both tear L1 down."""
    import logging
    logging.basicConfig(level=logging.WARNING, format="kvmpy-nested: %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        return main_argv(sys.argv[1:] if argv is None else argv)
    except KvmpyError as e:
        print(f"kvmpy nested: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmpy nested: interrupted; L1 stopped", file=sys.stderr)
        return 130
