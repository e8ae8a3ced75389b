"""Classic BPF for seccomp, written by hand: a compiler from per-syscall rules to a program, and
an interpreter of that program (tier 0 checks the compiled program against the rules it came
from without installing anything).

Why raw BPF rather than libseccomp (`pyseccomp`): kvmpy must build and run from a fresh clone
without a network-fetched binding or a C library that may be missing, the rules are small (one
chain of syscall numbers plus a few argument checks), and doing it ourselves keeps one subtle
point exact that libseccomp has got wrong before: the kernel reads an ioctl request, a clone's
flags and uid/gid arguments as 32-bit values, so every argument check here compares only the low
32 bits (upper bits set by an attacker cannot slip past a check the kernel then ignores).

Program shape (x86-64 only):
    arch != AUDIT_ARCH_X86_64           -> kill the process
    nr has the x32 bit                  -> kill the process
    for each syscall with rules:  nr == N ? (its block, which always returns) : next
    otherwise                           -> allow
A block tries its rules in order; a rule's checks are all (arg & mask) == value; the first rule
whose checks hold gives the action, and a block with no unconditional rule ends in "allow".
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

# struct sock_filter opcodes (linux/filter.h, linux/bpf_common.h)
LD_W_ABS = 0x20          # BPF_LD | BPF_W | BPF_ABS
ALU_AND_K = 0x54         # BPF_ALU | BPF_AND | BPF_K
JMP_JEQ_K = 0x15         # BPF_JMP | BPF_JEQ | BPF_K
JMP_JGE_K = 0x35         # BPF_JMP | BPF_JGE | BPF_K
RET_K = 0x06             # BPF_RET | BPF_K
BPF_MAXINSNS = 4096

# seccomp return values (linux/seccomp.h)
RET_KILL_PROCESS = 0x8000_0000
RET_TRAP = 0x0003_0000
RET_ERRNO = 0x0005_0000
RET_ALLOW = 0x7FFF_0000
RET_DATA = 0x0000_FFFF

AUDIT_ARCH_X86_64 = 0xC000_003E
X32_SYSCALL_BIT = 0x4000_0000

# offsets into struct seccomp_data { int nr; __u32 arch; __u64 ip; __u64 args[6]; }
OFF_NR, OFF_ARCH = 0, 4


def arg_low(index: int) -> int:
    """Offset of the low 32 bits of args[index] (little-endian)."""
    return 16 + 8 * index


def errno_action(errno: int) -> int:
    return RET_ERRNO | (errno & RET_DATA)


@dataclass(frozen=True)
class ArgCheck:
    """(args[arg] & mask) == value, on the argument's low 32 bits."""
    arg: int
    value: int
    mask: int = 0xFFFF_FFFF

    def holds(self, args: tuple[int, ...]) -> bool:
        return (args[self.arg] & 0xFFFF_FFFF & self.mask) == self.value


@dataclass(frozen=True)
class Rule:
    """`action` when every check holds (no checks: always)."""
    action: int
    checks: tuple[ArgCheck, ...] = ()

    def holds(self, args: tuple[int, ...]) -> bool:
        return all(c.holds(args) for c in self.checks)


Rules = dict[int, tuple[Rule, ...]]     # syscall number -> its rules, first match wins


def decide(rules: Rules, nr: int, args: tuple[int, ...]) -> int:
    """What the compiled program returns for an x86-64 call (the reference the tests use)."""
    for rule in rules.get(nr, ()):
        if rule.holds(args):
            return rule.action
    return RET_ALLOW


Insn = tuple[int, int, int, int]        # (code, jt, jf, k)


def _block(rules: tuple[Rule, ...]) -> list[Insn]:
    """The instructions for one syscall's rules; every path ends in a return."""
    out: list[Insn] = []
    for rule in rules:
        body: list[Insn] = []
        for check in rule.checks:
            body.append((LD_W_ABS, 0, 0, arg_low(check.arg)))
            if check.mask != 0xFFFF_FFFF:
                body.append((ALU_AND_K, 0, 0, check.mask))
            body.append((JMP_JEQ_K, 0, 0, check.value))   # jf patched below: to the next rule
        body.append((RET_K, 0, 0, rule.action))
        end = len(body)
        for i, (code, jt, jf, k) in enumerate(body):
            if code == JMP_JEQ_K:
                body[i] = (code, 0, end - i - 1, k)
        out += body
        if not rule.checks:
            return out          # unconditional: nothing after it can be reached
    out.append((RET_K, 0, 0, RET_ALLOW))
    return out


def compile_rules(rules: Rules, first: tuple[int, ...] = ()) -> list[Insn]:
    """The seccomp program for `rules`. Syscalls in `first` are tested first (the hot ones:
    a vCPU's ioctl); the rest follow in number order."""
    prog: list[Insn] = [
        (LD_W_ABS, 0, 0, OFF_ARCH),
        (JMP_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, RET_KILL_PROCESS),
        (LD_W_ABS, 0, 0, OFF_NR),
        (JMP_JGE_K, 0, 1, X32_SYSCALL_BIT),
        (RET_K, 0, 0, RET_KILL_PROCESS),
    ]
    order = [nr for nr in first if nr in rules] + sorted(nr for nr in rules if nr not in first)
    for nr in order:
        block = _block(rules[nr])
        if len(block) > 255:
            raise ValueError(f"syscall {nr}: {len(block)} instructions do not fit one BPF jump")
        prog.append((JMP_JEQ_K, 0, len(block), nr))
        prog += block
    prog.append((RET_K, 0, 0, RET_ALLOW))
    if len(prog) > BPF_MAXINSNS:
        raise ValueError(f"seccomp program of {len(prog)} instructions > {BPF_MAXINSNS}")
    return prog


def pack(prog: list[Insn]) -> bytes:
    """The program as the kernel's array of struct sock_filter."""
    return b"".join(struct.pack("<HBBI", code, jt, jf, k) for code, jt, jf, k in prog)


def seccomp_data(nr: int, args: tuple[int, ...] = (0,) * 6, arch: int = AUDIT_ARCH_X86_64, ip: int = 0) -> bytes:
    return struct.pack("<IIQ6Q", nr & 0xFFFF_FFFF, arch, ip, *args)   # nr is an int; BPF reads it as u32


def run(prog: list[Insn], data: bytes) -> int:
    """Interpret `prog` over a struct seccomp_data, as the kernel would (the subset emitted here)."""
    acc, pc = 0, 0
    for _ in range(len(prog) + 1):       # no backward jumps in cBPF: each insn runs at most once
        code, jt, jf, k = prog[pc]
        pc += 1
        if code == LD_W_ABS:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code == ALU_AND_K:
            acc &= k
        elif code == JMP_JEQ_K:
            pc += jt if acc == k else jf
        elif code == JMP_JGE_K:
            pc += jt if acc >= k else jf
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"opcode {code:#x} at {pc - 1} is not one this compiler emits")
    raise ValueError("program ran off its end")
