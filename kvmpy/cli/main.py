"""The `kvmpy` command line: argv -> subcommand handler -> exit code.

Every KvmpyError becomes one line on stderr and a non-zero exit; no tracebacks reach users
unless --log-level debug asks for them.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import sys
from typing import Callable, Sequence

from kvmpy.errors import KvmpyError

log = logging.getLogger("kvmpy")


def _handler(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib
        return getattr(importlib.import_module(module), func)(args)
    return run


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized like shutil.get_terminal_size() without importing shutil:
    argparse builds one for every add_argument, and shutil (bz2, lzma, ...) costs start-up
    time, which the nested harness multiplies ~30x."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None):
        if width is None:
            try:
                width = int(os.environ.get("COLUMNS", "0")) or os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmpy", description="A KVM userspace VMM in Python",
                                formatter_class=_HelpFormatter)
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"], help="logging verbosity")
    sub = p.add_subparsers(dest="command", required=True, prog="kvmpy")

    info = sub.add_parser("info", formatter_class=_HelpFormatter, help="print this host's KVM facts and what they mean")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--device", default="/dev/kvm", help="KVM device path")
    info.set_defaults(func=_handler("kvmpy.cli.info", "main"))

    bench = sub.add_parser("bench", formatter_class=_HelpFormatter, help="micro-benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True, prog="kvmpy bench")
    ex = bsub.add_parser("exits", formatter_class=_HelpFormatter, help="port-I/O exit round trips through the dispatch path")
    ex.add_argument("--count", type=int, default=20000)
    ex.add_argument("--device", default="/dev/kvm")
    ex.set_defaults(func=_handler("kvmpy.cli.bench", "exits_main"))

    from kvmpy.cli.bootargs import add_boot_arguments
    boot = sub.add_parser("boot", formatter_class=_HelpFormatter, help="boot a kernel (bzImage, PVH ELF or multiboot)")
    add_boot_arguments(boot)
    boot.set_defaults(func=_handler("kvmpy.cli.boot", "main"))

    from kvmpy.cli.qmp import add_arguments as add_qmp_arguments
    qmp = sub.add_parser("qmp", formatter_class=_HelpFormatter,
                         help="send one QMP command to a running kvmpy (or follow its events)")
    add_qmp_arguments(qmp)
    qmp.set_defaults(func=_handler("kvmpy.cli.qmp", "main"))

    nested = sub.add_parser("nested", formatter_class=_HelpFormatter, help="run commands inside the nested hardware-KVM harness")
    nested.add_argument("nested_args", nargs=argparse.REMAINDER)
    nested.set_defaults(func=_handler("kvmpy.nested.cli", "main"))
    return p


def ensure_standard_fds() -> None:
    """Give a closed stdin/stdout/stderr (`2>&-`) /dev/null. Otherwise the next file kvmpy opens
    (/dev/kvm, a disk image) would get fd 2 and receive error messages, and Python leaves
    sys.stderr None, which faulthandler and print() refuse."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:      # a lower fd was closed too and took it; it is fixed on its turn
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            stream = os.fdopen(fd, mode, closefd=False)
            setattr(sys, name, stream)
            setattr(sys, f"__{name}__", stream)


def main(argv: Sequence[str] | None = None) -> int:
    ensure_standard_fds()
    # SIGUSR2 asks for a state report; until a machine runs (it then reports vCPUs too), the
    # Python stacks: a start-up that hangs is diagnosable, and the signal never kills kvmpy.
    try:
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):
        pass  # no usable stderr (embedded use): then no early dump, and nothing else changes
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "boot_log_level", None):   # `kvmpy boot --log-level X`, as in the CLI
        args.log_level = args.boot_log_level
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="kvmpy: [%(relativeCreated)6.0fms] %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KvmpyError as e:
        if args.log_level == "debug":
            log.exception("failed")
        print(f"kvmpy: error: {e}", file=sys.stderr)
        return int(getattr(e, "exit_status", 1))   # e.g. 124 for a --timeout during start-up
    except OSError as e:
        if args.log_level == "debug":
            log.exception("failed")
        print(f"kvmpy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvmpy: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: still one line for users, the traceback under debug
        log.debug("internal error", exc_info=True)
        print(f"kvmpy: internal error: {type(e).__name__}: {e} (rerun with --log-level debug "
              "for the traceback)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
