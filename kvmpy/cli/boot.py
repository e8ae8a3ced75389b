"""`kvmpy boot`: check the request against this host, build the Machine, run it, report."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from kvmpy import sandbox
from kvmpy.boot.image import read_kernel
from kvmpy.boot.loader import detect_format
from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.cli.info import host_kvm_kind
from kvmpy.machine import Machine
from kvmpy.machine.config import MachineConfig

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


class StartupTimeout(KvmpyError):
    """--timeout ran out before the guest started (an open, a monitor's wait=on client)."""
    exit_status = 124      # as when the guest runs out of time: `timeout(1)`'s status


class Terminated(KvmpyError):
    """SIGTERM or SIGHUP arrived before the guest started."""

    def __init__(self, signum: int):
        self.exit_status = 128 + signum
        super().__init__("starting the machine", detail=f"terminated by {signal.Signals(signum).name}")


def main(args: argparse.Namespace) -> int:
    """Check everything, then build and run the machine. --timeout counts from here, before any
    file is opened, and SIGTERM/SIGHUP end kvmpy through the same clean-up as a guest's
    poweroff (consoles flushed, sockets unlinked)."""
    config = MachineConfig.from_args(args)
    qmp = getattr(args, "qmp", None) or []
    if qmp:
        check_monitor_paths(config, qmp)
    if config.incoming is None:
        check_host(config)
    guard = _ExitGuard(config.timeout)
    try:
        guard.arm()
        with Machine(config) as machine:
            # all set before any monitor listens: a QMP `cont` or `stop` there builds the machine
            # SIGUSR2 asks for a state report; the supervisor thread writes it (never in a handler)
            signal.signal(signal.SIGUSR2, lambda signum, frame: machine.request_report())
            guard.machine = machine
            machine.jail_paths += _monitor_socket_paths(qmp)    # handed to --runas
            with _monitors(machine, qmp):
                if config.incoming is None:
                    machine.start(unless_started=True)     # a QMP `cont` or `stop` may have been first
                elif config.incoming != "defer":
                    machine.incoming(config.incoming)
                sandbox.enter("main", machine.confinement.policy)   # set up: from here on, only waiting
                result = machine.run()
            if config.stats:
                print(machine.stats_text, file=sys.stderr)
    finally:
        guard.disarm()
    log.info("guest ended: %s", result.reason)
    if result.status != 0:
        print(f"kvmpy: {result.reason}", file=sys.stderr)
    return result.status


class _ExitGuard:
    """The --timeout deadline (SIGALRM, from before the first open) and SIGTERM/SIGHUP. Before
    the machine runs they raise, so every `with` unwinds and removes what it created; once it
    runs they stop it, and the normal end path reports."""

    SIGNALS = (signal.SIGTERM, signal.SIGHUP)

    def __init__(self, timeout: float):
        self.timeout = timeout
        self.machine: Machine | None = None
        self._saved: dict[int, object] = {}

    def arm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return   # signals are the main thread's: an embedding caller keeps its own
        for signum in self.SIGNALS:
            self._saved[signum] = signal.signal(signum, self._on_signal)
        if self.timeout:
            self._saved[signal.SIGALRM] = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)

    def disarm(self) -> None:
        if signal.SIGALRM in self._saved:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for signum, handler in self._saved.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._saved.clear()

    def _running(self) -> bool:
        return self.machine is not None and (self.machine.board is not None or self.machine.status != "prelaunch")

    def _on_alarm(self, signum: int, frame: object) -> None:
        reason = f"timed out after {self.timeout:g} s"
        if self._running():
            self.machine.stop(reason, status=124)
        else:
            raise StartupTimeout("starting the machine", detail=f"{reason} (--timeout counts from start-up)")

    def _on_signal(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self._running():
            self.machine.stop(f"terminated by {name}", status=128 + signum)
        else:
            raise Terminated(signum)


def check_monitor_paths(config: MachineConfig, specs: list[str]) -> None:
    """Every --qmp spec parses, and no --qmp unix socket shares its path with another --qmp, a
    console, an --incoming unix: socket or one of the VM's inputs. Checked before anything is
    opened, so the user reads what is wrong ("--qmp and --serial both name ...") instead of what
    the second bind saw ("another process is listening"), and nothing is created or replaced."""
    from kvmpy.machine.checks import console_outputs, same_path
    from kvmpy.monitor.spec import parse_qmp_spec
    named: list[tuple[str, str]] = [(flag, path) for flag, _, path in console_outputs(config.serial,
                                                                                       config.virtio_console)]
    if config.incoming and config.incoming.startswith("unix:"):
        named.append(("--incoming", config.incoming[len("unix:"):]))
    inputs = config.io_inputs()
    for spec in specs:
        parsed = parse_qmp_spec(spec)
        if parsed.kind != "unix":
            continue
        for flag, path in named:
            if same_path(parsed.path, path):
                raise ConfigError(f"checking --qmp {spec!r}", detail=f"--qmp and {flag} both name "
                                  f"{path!r}: give each its own path")
        for what, path in inputs:
            if same_path(parsed.path, path):
                raise ConfigError(f"checking --qmp {spec!r}", detail=f"it is {what}: a monitor socket "
                                  "must not replace one of the VM's inputs")
        named.append(("another --qmp", parsed.path))


def _monitor_socket_paths(specs: list[str]) -> list[str]:
    """The --qmp unix sockets' paths (the specs were checked by check_monitor_paths)."""
    if not specs:
        return []
    from kvmpy.monitor.spec import parse_qmp_spec
    return [parsed.path for parsed in map(parse_qmp_spec, specs) if parsed.kind == "unix"]


def _monitors(machine: Machine, specs: list[str]):
    """The --qmp monitors (imported only when asked for: start-up time under nesting)."""
    if not specs:
        import contextlib
        return contextlib.nullcontext([])
    from kvmpy.monitor import serve_monitors
    return serve_monitors(machine, specs)
