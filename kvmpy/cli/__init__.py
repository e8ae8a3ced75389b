"""The `kvmpy` command line: argument parsing, subcommands, signals, exit codes and messages.

Only this package prints to users or installs signal handlers; everything below raises
KvmpyError and lets the CLI turn it into one line."""
from kvmpy.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
