"""What each kind of kvmpy thread may call: `--sandbox` options (QEMU's spelling) and the rules
they compile to, per thread kind.

Every kind is denied, by killing the process (QEMU's action): QEMU's default set widened (the
kernel's own state, other processes, namespaces and mounts, device nodes, see syscalls.SYSTEM),
the obsolete calls (obsolete=deny), changing credentials (elevateprivileges=deny; with --runas
only the one drop to that user is let through, since glibc makes every thread repeat it),
injecting terminal input (TIOCSTI, TIOCLINUX), and KVM_RUN outside the vCPU threads and the
threads that start them (a thread inherits its starter's filter, so those must allow what a vCPU
does: the supervisor on a reboot, the monitor's and migration threads on a restore). clone3 answers
ENOSYS (glibc then uses clone, whose flags a filter can see) and io_uring_setup EPERM (its rings
would run calls the filter never sees).

Per kind, on top (why: what the thread does after set-up):
  vcpu       KVM_RUN and its exits: ioctls of KVM (not KVM_CREATE_VM), vhost and TUN/tty only;
             no new file, socket, process or program (refused with EPERM: a device model that
             tries gets an OSError; a program or process: killed)
  io         the event loop: eventfds, image and TAP I/O on descriptors it holds; no new file,
             socket, process or program
  qmp-io     the monitor's socket thread: accepts and talks to clients; no new file, no socket
             of its own, no process or program
  monitor    the monitor's command thread, and migration (file:, exec:, tcp:/unix: URIs; a
  migration  restore builds a machine): files and sockets; processes and programs only for
             exec: URIs (spawn=deny refuses them with EPERM)
  console    the consoles' reader threads (stdin, a unix socket's clients): like qmp-io
  machine    the supervisor: a guest reboot rebuilds the VM (KVM_CREATE_VM, images, TAPs); no
             process or program
  main       the CLI's thread once the machine runs: signals, exit; no process or program
"""
from __future__ import annotations

import errno
from dataclasses import dataclass, field
from functools import cached_property

from kvmpy.errors import ConfigError
from kvmpy.options import split_options
from kvmpy.sandbox import syscalls as sc
from kvmpy.sandbox.bpf import (RET_ALLOW, RET_KILL_PROCESS, ArgCheck, Insn, Rule, Rules, compile_rules,
                               errno_action)

KILL = RET_KILL_PROCESS
EPERM = errno_action(errno.EPERM)
ENOSYS = errno_action(errno.ENOSYS)

CLONE_THREAD = 0x0001_0000
IOC_TYPE_MASK = 0xFF00
KVMIO, VHOST_VIRTIO, TTY_TUN = 0xAE, 0xAF, 0x54       # ioctl "type" bytes: KVM, vhost, 'T'
KVM_CREATE_VM, KVM_RUN = 0xAE01, 0xAE80
TIOCSTI, TIOCLINUX = 0x5412, 0x541C

# QEMU's -sandbox sub-options and the values each accepts; the first value is kvmpy's default
SUBOPTIONS: dict[str, tuple[str, ...]] = {
    "obsolete": ("deny", "allow"),
    "elevateprivileges": ("deny", "allow", "children"),
    "spawn": ("allow", "deny"),
    "resourcecontrol": ("allow", "deny"),
}


@dataclass(frozen=True)
class KindSpec:
    """What one kind of thread is denied beyond the common set."""
    spawn: bool             # may fork/exec (only for exec: migration URIs, and spawn=allow)
    open_files: bool        # may open or create files
    new_sockets: bool       # may create, bind, listen on or connect sockets
    accept: bool            # may accept connections on sockets it holds
    vcpu: bool = False      # KVM_RUN allowed, other ioctls limited to KVM/vhost/TUN/tty
    builds_vcpus: bool = False   # starts vCPU threads (reboot, restore): they inherit its filter,
                                 # so KVM_RUN cannot be killed here


# Where --chroot may happen after filters are on: `--incoming defer` builds the machine on the
# migration thread (started by the monitor's), which then confines kvmpy (Machine._open_consoles)
CHROOTING_KINDS = ("monitor", "migration")

KINDS: dict[str, KindSpec] = {
    "vcpu": KindSpec(spawn=False, open_files=False, new_sockets=False, accept=False, vcpu=True),
    "io": KindSpec(spawn=False, open_files=False, new_sockets=False, accept=False),
    "qmp-io": KindSpec(spawn=False, open_files=False, new_sockets=False, accept=True),
    "console": KindSpec(spawn=False, open_files=False, new_sockets=False, accept=True),
    "monitor": KindSpec(spawn=True, open_files=True, new_sockets=True, accept=True, builds_vcpus=True),
    "migration": KindSpec(spawn=True, open_files=True, new_sockets=True, accept=True, builds_vcpus=True),
    "machine": KindSpec(spawn=False, open_files=True, new_sockets=True, accept=True, builds_vcpus=True),
    "main": KindSpec(spawn=False, open_files=True, new_sockets=True, accept=True),
}


@dataclass(frozen=True)
class SandboxOptions:
    """`--sandbox on|off[,obsolete=..][,elevateprivileges=..][,spawn=..][,resourcecontrol=..]`.
    `explicit`: the user asked for on (refused where the kernel cannot), not the default."""
    enabled: bool = True
    explicit: bool = False
    obsolete: str = "deny"
    elevateprivileges: str = "deny"
    spawn: str = "allow"
    resourcecontrol: str = "allow"


def parse_sandbox_spec(text: str | None) -> SandboxOptions:
    """QEMU's -sandbox syntax. None: the default (on where the kernel supports seccomp)."""
    if text is None:
        return SandboxOptions()
    first, *rest = split_options(text)
    if first not in ("on", "off"):
        raise ConfigError("parsing --sandbox", detail=f"{first!r}: expected on or off, then options "
                                                      f"({', '.join(f'{k}=...' for k in SUBOPTIONS)})")
    values: dict[str, str] = {}
    for part in rest:
        key, eq, value = part.partition("=")
        if key not in SUBOPTIONS:
            raise ConfigError("parsing --sandbox", detail=f"unknown option {key!r}; kvmpy (as QEMU) "
                                                          f"has {', '.join(SUBOPTIONS)}")
        if not eq or value not in SUBOPTIONS[key]:
            raise ConfigError("parsing --sandbox", detail=f"{key}={value}: expected "
                                                          f"{' or '.join(SUBOPTIONS[key])}")
        if key in values:
            raise ConfigError("parsing --sandbox", detail=f"{key} given twice")
        values[key] = value
    if first == "off" and values:
        raise ConfigError("parsing --sandbox", detail=f"options ({', '.join(values)}) given with off")
    return SandboxOptions(enabled=first == "on", explicit=first == "on", **values)


@dataclass(frozen=True)
class RunAs:
    """The user --runas drops to: resolved once, before anything is opened."""
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class SandboxPolicy:
    """One machine's sandbox: its options and, with --runas, the one credential change allowed."""
    options: SandboxOptions = field(default_factory=SandboxOptions)
    runas: RunAs | None = None
    chroot: bool = False     # --chroot: the thread that restores a deferred incoming guest chroots

    def rules(self, kind: str) -> Rules:
        if kind not in KINDS:
            raise ValueError(f"unknown sandbox thread kind {kind!r}")
        spec, opts = KINDS[kind], self.options
        rules: Rules = {}

        def deny(names: tuple[str, ...], action: int) -> None:
            for name in names:
                rules[sc.NR[name]] = (Rule(action),)
        deny(sc.SYSTEM, KILL)
        if self.chroot and kind in CHROOTING_KINDS:
            del rules[sc.NR["chroot"]]
        if opts.obsolete == "deny":
            deny(sc.OBSOLETE, KILL)
        if opts.resourcecontrol == "deny":
            deny(sc.RESOURCE_CONTROL, KILL)
        if opts.elevateprivileges != "allow":
            deny(sc.ELEVATE_PRIVILEGES, KILL)
            if self.runas is not None:
                self._allow_the_drop(rules)
        rules[sc.NR["clone3"]] = (Rule(ENOSYS),)
        rules[sc.NR["io_uring_setup"]] = (Rule(EPERM),)
        may_spawn = spec.spawn and opts.spawn == "allow"
        if not may_spawn:
            action = EPERM if spec.spawn else KILL   # exec: URIs fail with one line; elsewhere an attack
            deny(sc.SPAWN, action)
            rules[sc.NR["clone"]] = (Rule(RET_ALLOW, (ArgCheck(0, CLONE_THREAD, CLONE_THREAD),)), Rule(action))
        if not spec.open_files:
            deny(sc.OPEN_FILES, EPERM)
        if not spec.new_sockets:
            deny(sc.NEW_SOCKETS, EPERM)
        if not spec.accept:
            deny(sc.ACCEPT, EPERM)
        rules[sc.NR["ioctl"]] = self._ioctl_rules(spec)
        for name in sc.HOT:
            rules.setdefault(sc.NR[name], (Rule(RET_ALLOW),))
        return rules

    def _allow_the_drop(self, rules: Rules) -> None:
        """glibc's setuid family runs the call on every thread (SIGSETXID): a sandboxed thread
        that exists when --runas drops must be allowed exactly that change, nothing else."""
        ra = self.runas
        assert ra is not None
        same = lambda value: tuple(ArgCheck(i, value) for i in range(3))  # noqa: E731
        rules[sc.NR["setresuid"]] = (Rule(RET_ALLOW, same(ra.uid)), Rule(KILL))
        rules[sc.NR["setresgid"]] = (Rule(RET_ALLOW, same(ra.gid)), Rule(KILL))
        rules[sc.NR["setgroups"]] = (Rule(RET_ALLOW, (ArgCheck(0, len(ra.groups)),)), Rule(KILL))

    @staticmethod
    def _ioctl_rules(spec: KindSpec) -> tuple[Rule, ...]:
        request = lambda value, mask=0xFFFF_FFFF: (ArgCheck(1, value, mask),)  # noqa: E731
        common = (Rule(KILL, request(TIOCSTI)), Rule(KILL, request(TIOCLINUX)))
        if spec.builds_vcpus:
            return common
        if not spec.vcpu:
            return common + (Rule(KILL, request(KVM_RUN)),)
        return (Rule(RET_ALLOW, request(KVM_RUN)), Rule(KILL, request(KVM_CREATE_VM))) + common + (
            Rule(RET_ALLOW, request(KVMIO << 8, IOC_TYPE_MASK)),
            Rule(RET_ALLOW, request(VHOST_VIRTIO << 8, IOC_TYPE_MASK)),
            Rule(RET_ALLOW, request(TTY_TUN << 8, IOC_TYPE_MASK)),
            Rule(EPERM))

    def program(self, kind: str) -> list[Insn]:
        return self._programs[kind]

    @cached_property
    def _programs(self) -> dict[str, list[Insn]]:
        first = tuple(sc.NR[name] for name in sc.HOT)
        return {kind: compile_rules(self.rules(kind), first) for kind in KINDS}
