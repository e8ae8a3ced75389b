"""Least privilege for a running machine: seccomp filters per thread kind (`--sandbox`, QEMU's
spelling), and `--runas`/`--chroot` (kvmpy.sandbox.jail).

How a thread gets its filter: the thread that builds a part of the machine (the CLI's main
thread, the supervisor on a reboot, the migration thread on a restore) holds the machine's
SandboxPolicy (`adopt`, or `enter`, which adopts too); objects that will run threads capture it
when constructed (`inherited()`), and the thread calls `enter(kind, policy)` first thing. A
machine with the sandbox off has policy None and nothing happens, so several machines with
different settings can share a process (the in-process API, the tests).

Why filters go on after set-up and not before: everything is opened first (devices, images,
TAPs, sockets), then each thread is allowed only what its loop does with what it holds.
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable

from kvmpy.errors import ConfigError
from kvmpy.sandbox.policy import KINDS, RunAs, SandboxOptions, SandboxPolicy, parse_sandbox_spec
from kvmpy.sandbox.seccomp import SandboxError, install, unsupported_reason

__all__ = ["JAILED_REBOOT", "KINDS", "Confinement", "RunAs", "SandboxError", "SandboxOptions", "SandboxPolicy",
           "adopt", "confine", "confinement", "enter", "inherited", "make_policy", "parse_sandbox_spec",
           "start_filtered", "unsupported_reason"]

log = logging.getLogger(__name__)
_local = threading.local()
_warned_unsupported: list[bool] = []

# Test hook (tier 1): "KIND:CALL[,KIND:CALL...]" makes a thread of KIND try CALL (execve, open,
# socket, chroot, kvm_run) right after its filter is on, and log what happened.
SELFTEST_ENV = "KVMPY_SANDBOX_SELFTEST"


@dataclass(frozen=True)
class Confinement:
    """A machine's --sandbox, --runas and --chroot, checked and resolved."""
    policy: SandboxPolicy | None
    runas: RunAs | None = None
    chroot: str | None = None

    @property
    def jailed(self) -> bool:
        """True when kvmpy gives up root's view of the host after set-up (it cannot reopen
        what it opened before: a guest reboot then ends kvmpy, as Firecracker's does)."""
        return self.runas is not None or self.chroot is not None


def confinement(sandbox: str | None, runas: str | None, chroot: str | None) -> Confinement:
    """Check and resolve the three flags (unknown user, missing directory, not root, a bad
    --sandbox option: one ConfigError each, before anything is opened)."""
    from kvmpy.sandbox.jail import check_chroot, check_privileged, resolve_runas
    user = resolve_runas(runas) if runas is not None else None
    root = check_chroot(chroot) if chroot is not None else None
    check_privileged(user, root)
    return Confinement(make_policy(sandbox, user, chroot=root is not None), user, root)


JAILED_REBOOT = ("the guest rebooted: under --runas/--chroot kvmpy cannot reopen its images and TAPs "
                 "as root, so it ends here, as with --no-reboot")


def confine(conf: Confinement, owned_paths: list[str]) -> Callable[[], None]:
    """--chroot then --runas, once everything is open (see kvmpy.sandbox.jail). Returns what
    removes, at the very end, the sockets that a chroot left outside (their paths are gone)."""
    if not conf.jailed:
        return lambda: None
    from kvmpy.sandbox.jail import enter_jail
    outside = enter_jail(conf.runas, conf.chroot, owned_paths)
    return outside.remove if outside is not None else lambda: None


def make_policy(spec: str | None, runas: RunAs | None = None, chroot: bool = False) -> SandboxPolicy | None:
    """The policy for a machine's `--sandbox` value (None: the default, on where the kernel can),
    or None when the sandbox is off. An explicit `on` on a kernel that cannot is refused."""
    options = parse_sandbox_spec(spec)
    if not options.enabled:
        return None
    reason = unsupported_reason()
    if reason is not None:
        if options.explicit:
            raise ConfigError("checking --sandbox on", detail=f"{reason}; use --sandbox off")
        if not _warned_unsupported:
            _warned_unsupported.append(True)
            log.info("sandbox off: %s", reason)
        return None
    return SandboxPolicy(options, runas, chroot)


def adopt(policy: SandboxPolicy | None) -> None:
    """Make `policy` the one this thread passes on to the threads it builds."""
    _local.policy = policy


def inherited() -> SandboxPolicy | None:
    """The policy of the thread constructing a thread-owning object (None: no sandbox)."""
    return getattr(_local, "policy", None)


def enter(kind: str, policy: SandboxPolicy | None, name: str | None = None) -> None:
    """Filter this thread as `kind` under `policy` (no-op for None); call it first in the
    thread's loop. Also adopts the policy, so what this thread builds gets it too."""
    adopt(policy)
    if policy is None:
        return
    selftest = os.environ.get(SELFTEST_ENV)
    if selftest:
        import fcntl, socket  # noqa: E401,F401  (loaded while this thread may still open files)
    main = threading.current_thread() is threading.main_thread()   # its name is the process's
    install(policy.program(kind), None if main else name or f"kvmpy-{kind}")
    log.debug("sandbox on for %s thread %s", kind, threading.current_thread().name)
    if selftest:
        _selftest(kind, selftest)


def start_filtered(kind: str, policy: SandboxPolicy | None, start: Callable[[], object]) -> None:
    """Run `start` on a short-lived thread filtered as `kind`, and wait: the threads it starts
    inherit the filter. For threads whose loop kvmpy.sandbox cannot reach (the consoles')."""
    if policy is None:
        start()
        return
    errors: list[BaseException] = []

    def run() -> None:
        try:
            enter(kind, policy)
            start()
        except BaseException as e:   # handed to the caller's thread, as if it had run there
            errors.append(e)
    starter = threading.Thread(target=run, name=f"kvmpy-{kind}-start", daemon=True)
    starter.start()
    starter.join()
    if errors:
        raise errors[0]


def _selftest(kind: str, spec: str) -> None:
    """Try each forbidden call asked for this kind; a refused one logs its errno, a killed one
    ends the process (SIGSYS), an allowed one says so (the test then fails)."""
    for item in spec.split(","):
        target, _, call = item.partition(":")
        if target != kind:
            continue
        try:
            _try_call(call, kind)
        except OSError as e:
            log.warning("sandbox self-test (%s): %s refused: %s", kind, call, os.strerror(e.errno or 0))
        else:
            log.warning("sandbox self-test (%s): %s ALLOWED", kind, call)


def _try_call(call: str, kind: str) -> None:
    if call == "execve":
        os.execv("/bin/true", ["true"])
    elif call == "open":
        path = f"/tmp/kvmpy-selftest-{kind}-{os.getpid()}"
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        os.unlink(path)
    elif call == "socket":
        import socket
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
    elif call == "chroot":
        os.chroot("/")
    elif call == "kvm_run":
        import fcntl
        from kvmpy.sandbox.policy import KVM_RUN
        fcntl.ioctl(0, KVM_RUN)
    else:
        raise OSError(0, f"unknown self-test call {call!r}")
