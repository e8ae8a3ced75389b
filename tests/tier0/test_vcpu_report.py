"""The hang report (kill -USR2): registers, mode, events and the code at RIP, over fake vCPUs
holding the real kernel structs (no /dev/kvm)."""
from __future__ import annotations

from kvmpy.ioctl._kvm import ffi
from kvmpy.vcpu import report

RAM = bytearray(64 * 1024)
RAM[0x1234:0x1238] = b"\xf3\x90\xeb\xfc"  # pause; jmp back
RAM[0x9000:0x9010] = (0xFFFF_FFFF_8100_2000).to_bytes(8, "little") + (7).to_bytes(8, "little")


class FakeVcpu:
    id = 3

    def __init__(self, long_mode=True, mapped=True, exception=None):
        self.regs = ffi.new("struct kvm_regs *")
        self.regs.rip = 0xFFFF_FFFF_8100_1234 if long_mode else 0x1234
        self.regs.rsp = 0x9000
        self.regs.rflags = 0x246
        self.sregs = ffi.new("struct kvm_sregs *")
        self.sregs.cr0 = 0x8000_0011 if long_mode else 0x10
        self.sregs.efer = 0x500 if long_mode else 0
        self.sregs.cs.l = 1 if long_mode else 0
        self.sregs.cs.selector = 0x10
        self.mp = ffi.new("struct kvm_mp_state *")
        self.mp.mp_state = 3
        self.events = ffi.new("struct kvm_vcpu_events *")
        if exception is not None:
            self.events.exception.pending = 1
            self.events.exception.nr = exception
            self.events.exception.has_error_code = 1
            self.events.exception.error_code = 0x18
        self.mapped = mapped
        self.translated = []

    def get_regs(self):
        return self.regs

    def get_sregs(self):
        return self.sregs

    def get_mp_state(self):
        return self.mp

    def get_vcpu_events(self):
        return self.events

    def translate(self, linear):
        self.translated.append(linear)
        return (linear & 0xFFFF) if self.mapped else None


def read_ram(gpa: int, length: int) -> bytes:
    if gpa + length > len(RAM):
        raise ValueError("outside RAM")
    return bytes(RAM[gpa:gpa + length])


def test_long_mode_vcpu_shows_registers_mode_and_code_at_rip():
    v = FakeVcpu()
    text = "\n".join(report.describe_vcpu(v, read_ram))
    assert text.startswith("vcpu3: halted rip=0xffffffff81001234 rsp=0x0000000000009000")
    assert "long-mode" in text and "cpl=0" in text and "efer=0x500" in text
    assert "events: none" in text
    assert "code: gpa 0x1234: f3 90 eb fc 00" in text
    assert v.translated == [0xFFFF_FFFF_8100_1234, 0x9000]
    assert "stack: 0xffffffff81002000 0x7 0x0 " in text


def test_real_mode_rip_adds_the_cs_base_and_the_code_read_stays_in_its_page():
    v = FakeVcpu(long_mode=False)
    v.sregs.cs.base = 0xF000
    v.regs.rip = 0x0FF8
    assert "real-mode" in report.describe_vcpu(v, read_ram)[0]
    assert v.translated[0] == 0xFFF8
    assert report.describe_vcpu(v, read_ram)[-2].endswith("gpa 0xfff8: " + " ".join(["00"] * 8))  # the page ends


def test_unmapped_outside_ram_and_failing_translation_are_said_not_raised():
    assert "is not mapped" in report.code_at(FakeVcpu(mapped=False), 0x1000, read_ram)
    assert "outside guest RAM" in report.code_at(FakeVcpu(), 0xF000, lambda g, n: read_ram(g + 0x100000, n))

    class Broken(FakeVcpu):
        def translate(self, linear):
            raise OSError(22, "bad")
    assert "cannot translate" in report.code_at(Broken(), 0x10, read_ram)


def test_pending_exception_and_nmi_are_listed():
    v = FakeVcpu(exception=14)
    v.events.nmi.pending = 1
    line = report.describe_events(v.events)
    assert line == "exception 14 pending error 0x18, nmi pending"


def test_ioapic_lists_live_pins_and_a_stuck_level_interrupt():
    chip = ffi.new("struct kvm_irqchip *")
    io = chip.chip.ioapic
    for pin in range(24):
        io.redirtbl[pin].bits = 1 << 16  # masked, idle: left out
    io.redirtbl[2].bits = 0x30
    io.redirtbl[11].bits = 0x41 | 1 << 15 | 1 << 14  # level, remote IRR set: an EOI never came
    io.irr = 1 << 11 | 1 << 5
    text = report.describe_ioapic(io)
    assert text == "ioapic: 2:vec=0x30 5:vec=0x0 masked pending 11:vec=0x41 level remote_irr pending"
    for pin in range(24):
        io.redirtbl[pin].bits = 1 << 16
    io.irr = 0
    assert report.describe_ioapic(io) == "ioapic: every pin masked and idle"


def test_pic_line():
    chip = ffi.new("struct kvm_irqchip *")
    chip.chip.pic.irr = 0x11
    chip.chip.pic.imr = 0xFB
    chip.chip.pic.irq_base = 0x30
    assert report.describe_pic(chip.chip.pic, "master") == "pic-master: irr=0x11 imr=0xfb isr=0x00 base=0x30"


def test_the_cli_turns_sigusr2_into_a_stack_dump_before_anything_else(monkeypatch, capsys):
    import faulthandler
    import signal
    import sys

    from kvmpy import cli
    seen = []
    monkeypatch.setattr(faulthandler, "register", lambda signum, **kw: seen.append((signum, kw)))
    assert cli.main(["info", "--device", "/nonexistent/kvm"]) == 1
    assert seen == [(signal.SIGUSR2, {"file": sys.__stderr__, "all_threads": True})]


def test_python_stacks_names_every_thread():
    import threading
    ready, release = threading.Event(), threading.Event()

    def parked_worker():
        ready.set()
        release.wait(10)
    t = threading.Thread(target=parked_worker, name="vcpu7")
    t.start()
    ready.wait(10)
    try:
        text = report.python_stacks()
    finally:
        release.set()
        t.join()
    assert "Thread vcpu7 (most recent call last):" in text and "in parked_worker" in text
    assert "Thread MainThread" in text and "test_python_stacks_names_every_thread" in text
