"""A human-readable snapshot of a stuck guest: each vCPU's registers and the code at RIP, and
the in-kernel interrupt controllers' pending state.

This is what `kill -USR2 <kvmpy pid>` prints (and what the tier-2 runner asks for before it
kills a guest that timed out): a hang with no console output otherwise leaves nothing to go on.
Pure formatting over ioctl results, so the text is tested without /dev/kvm.
"""
from __future__ import annotations

import sys
import threading
import traceback
from typing import TYPE_CHECKING, Callable, Protocol

from kvmpy.errors import KvmpyError

if TYPE_CHECKING:
    from kvmpy.vcpu.runner import VcpuThread

# KVM_MP_STATE_* (linux/kvm.h); names as QEMU's `info cpus` would say them
MP_STATES = {0: "runnable", 1: "uninitialized", 2: "init-received", 3: "halted",
             4: "sipi-received", 5: "stopped", 6: "check-stop", 7: "operating", 8: "load"}
CODE_BYTES = 16
STACK_WORDS = 12
IOAPIC_PINS = 24
PAUSE_S = 2.0


class VcpuLike(Protocol):
    id: int

    def get_regs(self): ...
    def get_sregs(self): ...
    def get_mp_state(self): ...
    def get_vcpu_events(self): ...
    def translate(self, linear_address: int) -> int | None: ...


ReadGuest = Callable[[int, int], bytes]  # (gpa, length) -> bytes; raises on addresses outside RAM


def describe_vcpu(vcpu: VcpuLike, read_guest: ReadGuest) -> list[str]:
    """Registers, mode, pending events and the bytes at RIP, in a few lines."""
    r = vcpu.get_regs()
    s = vcpu.get_sregs()
    mp = vcpu.get_mp_state().mp_state
    ev = vcpu.get_vcpu_events()
    flat64 = bool(s.efer & 0x400 and s.cs.l)  # 64-bit code: segment bases are ignored
    rip = int(r.rip) + (0 if flat64 else int(s.cs.base))
    rsp = int(r.rsp) + (0 if flat64 else int(s.ss.base))
    word = 8 if flat64 else (4 if s.cs.db else 2)
    lines = [
        f"vcpu{vcpu.id}: {MP_STATES.get(mp, f'mp_state {mp}')} rip={int(r.rip):#018x} "
        f"rsp={int(r.rsp):#018x} rflags={int(r.rflags):#x} cs={int(s.cs.selector):#06x} "
        f"cpl={int(s.cs.dpl)} {cpu_mode(s)}",
        f"  rax={int(r.rax):#x} rbx={int(r.rbx):#x} rcx={int(r.rcx):#x} rdx={int(r.rdx):#x} "
        f"rsi={int(r.rsi):#x} rdi={int(r.rdi):#x} rbp={int(r.rbp):#x}",
        f"  cr0={int(s.cr0):#x} cr2={int(s.cr2):#x} cr3={int(s.cr3):#x} cr4={int(s.cr4):#x} "
        f"efer={int(s.efer):#x} apic_base={int(s.apic_base):#x} idt={int(s.idt.base):#x}/{int(s.idt.limit):#x}",
        "  events: " + describe_events(ev),
        "  code: " + code_at(vcpu, rip, read_guest),
        "  stack: " + stack_at(vcpu, rsp, read_guest, word),
    ]
    return lines


def cpu_mode(sregs) -> str:
    if not sregs.cr0 & 1:
        return "real-mode"
    if sregs.efer & 0x400:
        return "long-mode" if sregs.cs.l else "compat-mode"
    return "protected-mode" + (" paging" if sregs.cr0 & 0x8000_0000 else "")


def describe_events(ev) -> str:
    parts = []
    x = ev.exception
    if x.injected or x.pending:
        parts.append(f"exception {int(x.nr)} {'injected' if x.injected else 'pending'}"
                     + (f" error {int(x.error_code):#x}" if x.has_error_code else ""))
    if ev.interrupt.injected:
        parts.append(f"interrupt {int(ev.interrupt.nr):#x} injected")
    if ev.interrupt.shadow:
        parts.append("interrupt shadow")
    if ev.nmi.injected or ev.nmi.pending:
        parts.append("nmi " + ("injected" if ev.nmi.injected else "pending"))
    if ev.nmi.masked:
        parts.append("nmi masked")
    return ", ".join(parts) or "none"


def _read_virtual(vcpu: VcpuLike, linear: int, length: int,
                  read_guest: ReadGuest) -> tuple[int, bytes] | str:
    """(gpa, bytes) at `linear` through the vCPU's page tables, cut at the page's end (the next
    page may map elsewhere), or the reason there are none."""
    try:
        gpa = vcpu.translate(linear)
    except Exception as e:  # a vCPU in a mode KVM cannot translate: say so, keep the report
        return f"(cannot translate {linear:#x}: {e})"
    if gpa is None:
        return f"({linear:#x} is not mapped)"
    try:
        return gpa, bytes(read_guest(gpa, min(length, 0x1000 - (gpa & 0xFFF))))
    except Exception:
        return f"(gpa {gpa:#x} is outside guest RAM)"


def code_at(vcpu: VcpuLike, linear: int, read_guest: ReadGuest) -> str:
    """The bytes at `linear` (guest-virtual)."""
    got = _read_virtual(vcpu, linear, CODE_BYTES, read_guest)
    if isinstance(got, str):
        return got
    return f"gpa {got[0]:#x}: {got[1].hex(' ')}"


def stack_at(vcpu: VcpuLike, linear: int, read_guest: ReadGuest, word: int) -> str:
    """The top STACK_WORDS words of the stack: return addresses to look up in System.map."""
    got = _read_virtual(vcpu, linear, STACK_WORDS * word, read_guest)
    if isinstance(got, str):
        return got
    data = got[1][:len(got[1]) // word * word]
    return " ".join(f"{int.from_bytes(data[i:i + word], 'little'):#x}" for i in range(0, len(data), word))


def describe_ioapic(ioapic) -> str:
    """Unmasked or pending IOAPIC pins: vector, trigger, remote IRR (a stuck level interrupt
    shows as remote_irr=1 with irr set)."""
    pins = []
    irr = int(ioapic.irr)
    for pin in range(IOAPIC_PINS):
        bits = int(ioapic.redirtbl[pin].bits)
        masked = bits >> 16 & 1
        pending = irr >> pin & 1
        if masked and not pending:
            continue
        pins.append(f"{pin}:vec={bits & 0xFF:#x}{' level' if bits >> 15 & 1 else ''}"
                    f"{' remote_irr' if bits >> 14 & 1 else ''}{' masked' if masked else ''}"
                    f"{' pending' if pending else ''}")
    return "ioapic: " + (" ".join(pins) or "every pin masked and idle")


def describe_pic(pic, name: str) -> str:
    return (f"pic-{name}: irr={int(pic.irr):#04x} imr={int(pic.imr):#04x} isr={int(pic.isr):#04x} "
            f"base={int(pic.irq_base):#x}")


def machine_report(threads: "list[VcpuThread]", vm, read_guest: ReadGuest | None) -> list[str]:
    """Park every vCPU (a thread that cannot leave KVM_RUN is itself the finding), describe
    them and the irqchips, then let them run on."""
    lines = []
    # Threads already parked (a paused machine) stay parked: only those parked here resume.
    already = [t for t in threads if t.paused]
    parked = already + [t for t in threads if t not in already and t.pause(timeout=PAUSE_S)]
    try:
        for t in threads:
            if t not in parked:
                lines.append(f"vcpu{t.vcpu.id}: did not leave KVM_RUN within {PAUSE_S:g} s "
                             "(stuck in the host kernel?)")
                continue
            try:
                lines += describe_vcpu(t.vcpu, read_guest or _no_ram)
            except KvmpyError as e:
                lines.append(f"vcpu{t.vcpu.id}: {e}")
        if vm is not None:
            try:
                lines.append(describe_pic(vm.get_irqchip(0).chip.pic, "master"))
                lines.append(describe_pic(vm.get_irqchip(1).chip.pic, "slave"))
                lines.append(describe_ioapic(vm.get_irqchip(2).chip.ioapic))
            except KvmpyError as e:
                lines.append(f"irqchip: {e}")
    finally:
        for t in parked:
            if t not in already:
                t.resume()
    return lines


def _no_ram(gpa: int, length: int) -> bytes:
    raise KvmpyError("reading guest memory", detail="no guest RAM")


def python_stacks() -> str:
    """Every thread's Python stack, by thread name (works on any text stream, unlike
    faulthandler, which needs a real file descriptor)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"Thread {names.get(ident, hex(ident))} (most recent call last):\n"
                     + "".join(traceback.format_stack(frame)))
    return "".join(parts)
