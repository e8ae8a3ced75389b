"""Issue 13, least privilege, without installing anything: the seccomp programs kvmpy compiles
(run through a BPF interpreter) decide every call exactly as the per-kind rules say, the rules say
what the README promises each thread kind may do, and --sandbox/--runas/--chroot are checked
with one clear error each."""
from __future__ import annotations

import errno
import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from kvmpy import sandbox
from kvmpy.errors import ConfigError
from kvmpy.sandbox import bpf, syscalls as sc
from kvmpy.sandbox.jail import check_chroot, resolve_runas
from kvmpy.sandbox.policy import (KINDS, KVM_CREATE_VM, KVM_RUN, SUBOPTIONS, TIOCSTI, RunAs, SandboxOptions,
                                  SandboxPolicy, parse_sandbox_spec)

KILL, ALLOW = bpf.RET_KILL_PROCESS, bpf.RET_ALLOW
EPERM, ENOSYS = bpf.errno_action(errno.EPERM), bpf.errno_action(errno.ENOSYS)
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")
RUNAS = RunAs("kvm-user", 1234, 2345, (2345, 3456))

options_st = st.builds(SandboxOptions, obsolete=st.sampled_from(SUBOPTIONS["obsolete"]),
                       elevateprivileges=st.sampled_from(SUBOPTIONS["elevateprivileges"]),
                       spawn=st.sampled_from(SUBOPTIONS["spawn"]),
                       resourcecontrol=st.sampled_from(SUBOPTIONS["resourcecontrol"]))
policy_st = st.builds(SandboxPolicy, options=options_st, runas=st.sampled_from([None, RUNAS]), chroot=st.booleans())
# syscall numbers: the ones with rules, their neighbours, and anything else
nr_st = st.one_of(st.sampled_from(sorted(sc.NR.values())), st.integers(0, 500), st.integers(0, 0xFFFF_FFFF))
arg_st = st.one_of(st.sampled_from([0, KVM_RUN, KVM_CREATE_VM, TIOCSTI, 0xAE00 | 0x4B, 0xAF01, 0x5401, 0x10000,
                                    0x1200011, 1234, 2345, 2, 0x8914]),
                   st.integers(0, 0xFFFF_FFFF), st.integers(0, (1 << 64) - 1))


def verdict(policy: SandboxPolicy, kind: str, name: str | int, *args: int) -> int:
    nr = sc.NR[name] if isinstance(name, str) else name
    full = tuple(args) + (0,) * (6 - len(args))
    return bpf.run(policy.program(kind), bpf.seccomp_data(nr, full))


def test_syscall_numbers_match_the_kernel_header():
    header = UNISTD.read_text()   # kvmpy builds against the kernel headers: they are installed
    numbers = {m.group(1): int(m.group(2)) for m in re.finditer(r"#define __NR_(\w+) (\d+)", header)}
    for name, nr in sc.NR.items():
        assert numbers.get(name) == nr, name


def test_request_numbers_match_kvmpys_own():
    from kvmpy.ioctl import request_numbers as rn
    assert (KVM_RUN, KVM_CREATE_VM) == (rn.KVM_RUN, rn.KVM_CREATE_VM)


@settings(max_examples=300, deadline=None)
@given(policy=policy_st, kind=st.sampled_from(sorted(KINDS)), nr=nr_st,
       args=st.tuples(*[arg_st] * 6))
def test_the_compiled_program_decides_as_the_rules_say(policy, kind, nr, args):
    expected = bpf.decide(policy.rules(kind), nr, args) if nr < bpf.X32_SYSCALL_BIT else KILL
    assert bpf.run(policy.program(kind), bpf.seccomp_data(nr, args)) == expected


@given(arch=st.integers(0, 0xFFFF_FFFF).filter(lambda a: a != bpf.AUDIT_ARCH_X86_64), nr=nr_st)
def test_another_architecture_or_the_x32_abi_is_killed(arch, nr):
    prog = SandboxPolicy().program("monitor")
    assert bpf.run(prog, bpf.seccomp_data(nr % 500, arch=arch)) == KILL
    assert bpf.run(prog, bpf.seccomp_data(sc.NR["read"] | bpf.X32_SYSCALL_BIT)) == KILL


def test_every_program_fits_the_kernel_and_packs_to_sock_filters():
    for spec in ["on", "on,obsolete=allow,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"]:
        for runas in (None, RUNAS):
            policy = SandboxPolicy(parse_sandbox_spec(spec), runas, chroot=True)
            for kind in KINDS:
                prog = policy.program(kind)
                assert len(prog) < bpf.BPF_MAXINSNS and len(bpf.pack(prog)) == 8 * len(prog)


def test_vcpu_threads_run_kvm_and_nothing_new():
    p = SandboxPolicy()
    assert verdict(p, "vcpu", "ioctl", 7, KVM_RUN) == ALLOW
    assert verdict(p, "vcpu", "ioctl", 7, (0xFFFF_FFFF << 32) | KVM_RUN) == ALLOW   # the kernel reads 32 bits
    assert verdict(p, "vcpu", "ioctl", 7, 0xC008AE67) == ALLOW       # another KVM ioctl (MSI routing, irqfd...)
    assert verdict(p, "vcpu", "ioctl", 7, 0x4008AF03) == ALLOW       # vhost
    assert verdict(p, "vcpu", "ioctl", 7, 0x400454D0) == ALLOW       # TUNSETOFFLOAD
    assert verdict(p, "vcpu", "ioctl", 7, KVM_CREATE_VM) == KILL
    assert verdict(p, "vcpu", "ioctl", 0, TIOCSTI) == KILL          # typing into the user's terminal
    assert verdict(p, "vcpu", "ioctl", 7, 0x8914) == EPERM           # SIOCSIFFLAGS: not a vCPU's business
    for name in ("open", "openat", "openat2", "creat", "memfd_create", "socket", "connect", "bind", "accept4"):
        assert verdict(p, "vcpu", name) == EPERM, name
    for name in ("execve", "execveat", "fork", "vfork", "ptrace", "setuid", "mount", "chroot", "uselib"):
        assert verdict(p, "vcpu", name) == KILL, name
    assert verdict(p, "vcpu", "clone", 0x3D0F00) == ALLOW            # pthread_create's flags
    assert verdict(p, "vcpu", "clone", 0x1200011) == KILL            # fork()'s flags
    assert verdict(p, "vcpu", "clone3") == ENOSYS                    # glibc falls back to clone
    for name in ("read", "write", "futex", "mmap", "pwritev", "sendto", "epoll_wait"):
        assert verdict(p, "vcpu", sc.NR.get(name, 9)) == ALLOW, name


@pytest.mark.parametrize("kind", sorted(set(KINDS) - {"vcpu"}))
def test_only_vcpu_threads_and_their_builders_may_run_a_vcpu(kind):
    """A thread inherits the filter of the thread that started it: the supervisor (a reboot) and
    the monitor's and migration threads (a restore) start vCPUs, so they cannot forbid KVM_RUN."""
    p = SandboxPolicy()
    builds = kind in ("machine", "monitor", "migration")
    assert verdict(p, kind, "ioctl", 7, KVM_RUN) == (ALLOW if builds else KILL)
    assert verdict(p, kind, "ioctl", 7, (1 << 40) | KVM_RUN) == (ALLOW if builds else KILL)
    assert verdict(p, kind, "ioctl", 7, 0x8914) == ALLOW
    assert verdict(p, kind, "ioctl", 0, TIOCSTI) == KILL


def test_each_kind_has_what_its_loop_needs():
    p = SandboxPolicy()
    assert verdict(p, "io", "openat") == EPERM and verdict(p, "io", "socket") == EPERM
    assert verdict(p, "qmp-io", "accept4") == ALLOW and verdict(p, "qmp-io", "socket") == EPERM
    assert verdict(p, "qmp-io", "openat") == EPERM and verdict(p, "qmp-io", "execve") == KILL
    for kind in ("monitor", "migration"):            # file:, tcp:, exec: URIs; a restore builds a VM
        assert verdict(p, kind, "openat") == ALLOW and verdict(p, kind, "connect") == ALLOW
        assert verdict(p, kind, "execve") == ALLOW and verdict(p, kind, "clone", 0x1200011) == ALLOW
        assert verdict(p, kind, "ioctl", 7, KVM_CREATE_VM) == ALLOW
    for kind in ("machine", "main"):                 # a reboot rebuilds the VM; main only waits
        assert verdict(p, kind, "openat") == ALLOW and verdict(p, kind, "socket") == ALLOW
        assert verdict(p, kind, "execve") == KILL and verdict(p, kind, "clone", 0x1200011) == KILL
        assert verdict(p, kind, "ioctl", 7, KVM_CREATE_VM) == ALLOW


def test_qemu_suboptions_change_what_they_name():
    loose = SandboxPolicy(parse_sandbox_spec("on,obsolete=allow,elevateprivileges=allow"))
    assert verdict(loose, "io", "uselib") == ALLOW and verdict(loose, "io", "setuid") == ALLOW
    strict = SandboxPolicy(parse_sandbox_spec("on,spawn=deny,resourcecontrol=deny"))
    assert verdict(strict, "monitor", "execve") == EPERM            # an exec: URI fails with one line
    assert verdict(strict, "monitor", "clone", 0x1200011) == EPERM
    assert verdict(strict, "monitor", "clone", 0x3D0F00) == ALLOW
    assert verdict(strict, "vcpu", "execve") == KILL
    assert verdict(strict, "io", "sched_setaffinity") == KILL
    assert verdict(SandboxPolicy(), "io", "sched_setaffinity") == ALLOW
    assert verdict(SandboxPolicy(parse_sandbox_spec("on,elevateprivileges=children")), "io", "setuid") == KILL


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_runas_lets_through_only_the_one_drop(kind):
    p = SandboxPolicy(runas=RUNAS)
    assert verdict(p, kind, "setresuid", 1234, 1234, 1234) == ALLOW
    assert verdict(p, kind, "setresgid", 2345, 2345, 2345) == ALLOW
    assert verdict(p, kind, "setgroups", 2, 0x7FFF0000) == ALLOW
    assert verdict(p, kind, "setresuid", 0, 0, 0) == KILL
    assert verdict(p, kind, "setresuid", 1234, 1234, 0) == KILL
    assert verdict(p, kind, "setgroups", 3) == KILL
    assert verdict(p, kind, "setuid", 1234) == KILL
    assert verdict(SandboxPolicy(), kind, "setresuid", 1234, 1234, 1234) == KILL


def test_chroot_only_where_a_deferred_restore_may_confine():
    p = SandboxPolicy(chroot=True)
    assert verdict(p, "migration", "chroot") == ALLOW and verdict(p, "monitor", "chroot") == ALLOW
    assert all(verdict(p, kind, "chroot") == KILL for kind in ("vcpu", "io", "qmp-io", "machine", "main"))
    assert verdict(SandboxPolicy(), "migration", "chroot") == KILL


@pytest.mark.parametrize("text, expected", [
    (None, SandboxOptions()),
    ("on", SandboxOptions(explicit=True)),
    ("off", SandboxOptions(enabled=False)),
    ("on,obsolete=deny,elevateprivileges=children,spawn=deny,resourcecontrol=deny",
     SandboxOptions(explicit=True, elevateprivileges="children", spawn="deny", resourcecontrol="deny")),
])
def test_sandbox_spec_parses_qemus_spelling(text, expected):
    assert parse_sandbox_spec(text) == expected


@pytest.mark.parametrize("text, message", [
    ("", "expected on or off"), ("yes", "expected on or off"), ("on,foo=deny", "unknown option 'foo'"),
    ("on,spawn=children", "spawn=children: expected allow or deny"), ("on,spawn", "spawn=: expected"),
    ("on,spawn=deny,spawn=allow", "spawn given twice"), ("off,spawn=deny", "given with off"),
])
def test_bad_sandbox_specs_are_one_line(text, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        parse_sandbox_spec(text)
    assert "\n" not in str(info.value) and str(info.value).startswith("parsing --sandbox")


@given(st.text(max_size=60))
def test_any_sandbox_text_parses_or_is_a_config_error(text):
    try:
        parse_sandbox_spec(text)
    except ConfigError:
        pass


def test_sandbox_off_is_no_policy_and_default_follows_the_kernel(monkeypatch):
    assert sandbox.make_policy("off") is None
    monkeypatch.setattr(sandbox, "unsupported_reason", lambda: "the kernel has no seccomp (CONFIG_SECCOMP)")
    assert sandbox.make_policy(None) is None                 # the default quietly stays off
    with pytest.raises(ConfigError, match="the kernel has no seccomp.*use --sandbox off"):
        sandbox.make_policy("on")                             # asked for: refused, not ignored


def test_policies_pass_from_building_thread_to_built_threads():
    policy = SandboxPolicy()
    seen: list[object] = []
    sandbox.adopt(policy)
    try:
        assert sandbox.inherited() is policy
        t = threading.Thread(target=lambda: seen.append(sandbox.inherited()))
        t.start()
        t.join()
        assert seen == [None]          # a thread starts with none: it gets its machine's from enter()
        t = threading.Thread(target=lambda: (sandbox.enter("io", None), seen.append(sandbox.inherited())))
        t.start()
        t.join()
        assert seen == [None, None]
    finally:
        sandbox.adopt(None)


def test_runas_resolves_users_and_refuses_unknown_ones():
    nobody = resolve_runas("nobody")
    assert nobody.uid > 0 and nobody.gid in nobody.groups
    assert resolve_runas(f"{nobody.uid}") == nobody
    assert resolve_runas("4000000:4000001") == RunAs("4000000", 4000000, 4000001, (4000001,))
    for text, message in [("no-such-user-kvmpy", "there is no user 'no-such-user-kvmpy'"), ("root", "is root"),
                          ("0", "is root"), ("", "give a user name"), ("3999999", "give UID:GID")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            resolve_runas(text)


def test_chroot_needs_an_existing_directory(tmp_path):
    assert check_chroot(str(tmp_path)) == os.path.realpath(tmp_path)
    (tmp_path / "f").write_text("x")
    for path, message in [(tmp_path / "none", "No such file"), (tmp_path / "f", "is not a directory"),
                          (Path("/"), "is the root already")]:
        with pytest.raises(ConfigError, match=message):
            check_chroot(str(path))


def test_confinement_checks_all_three_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    conf = sandbox.confinement("off", "nobody", str(tmp_path))
    assert conf.policy is None and conf.jailed and conf.runas.user == "nobody"
    assert not sandbox.confinement("off", None, None).jailed
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match="checking --runas: kvmpy must start as root"):
        sandbox.confinement("off", "nobody", None)
    with pytest.raises(ConfigError, match="checking --chroot: kvmpy must start as root"):
        sandbox.confinement("off", None, str(tmp_path))
