"""Tiny guests through the real KVM: registers, port I/O, MMIO, pause/kick, state transfer."""
from __future__ import annotations

import time

from kvmpy.devices.bus import Bus
from kvmpy.ioctl import lib
from kvmpy.vcpu.dispatch import ExitDispatcher, Outcome
from kvmpy.vcpu.runner import StopKind, VcpuThread
from kvmpy.vcpu.state import get_vcpu_state, set_vcpu_state
from support.tinyguest import TinyTestVm


class Recorder:
    def __init__(self, answers: dict[int, bytes] | None = None):
        self.writes: list[tuple[int, bytes]] = []
        self.answers = answers or {}

    def read(self, offset: int, size: int) -> bytes:
        return self.answers.get(offset, b"\x00" * size)[:size]

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def buses():
    return Bus("pio", 1 << 16), Bus("mmio", 1 << 48)


def run_to_halt(tiny: TinyTestVm, pio: Bus, mmio: Bus, limit: int = 100000) -> ExitDispatcher:
    disp = ExitDispatcher(tiny.vcpu.run_map, pio, mmio)
    for _ in range(limit):
        assert tiny.vcpu.run()
        outcome = disp.dispatch()
        if outcome:
            assert outcome == Outcome.HALT, disp.detail
            return disp
    raise AssertionError("guest did not halt")


def test_registers_in_computation_out(tiny):
    tiny.load("regs", rbx=123456, rcx=789, rdx=42, rdi=0x5A5A5A5A)
    run_to_halt(tiny, *buses())
    regs = tiny.vcpu.get_regs()
    expected = (123456 * 789 + 42) & 0xFFFFFFFF
    assert regs.rax & 0xFFFFFFFF == expected
    assert regs.rsi & 0xFFFFFFFF == expected ^ 0x5A5A5A5A


def test_port_io_reaches_the_bus_device(tiny):
    pio, mmio = buses()
    dev = Recorder()
    pio.register(0x500, 4, dev)
    tiny.load("pio_loop", rcx=5, rdx=0x502)
    disp = run_to_halt(tiny, pio, mmio)
    assert dev.writes == [(2, bytes([n])) for n in (5, 4, 3, 2, 1)]
    assert disp.exits == 6


def test_mmio_read_returns_the_device_answer(tiny):
    pio, mmio = buses()
    dev = Recorder({0: (0x11223344).to_bytes(4, "little"), 8: b"\xcd\xab"})
    mmio.register(0xD0000, 0x100, dev)
    # shrink the RAM slot to 512 KiB so 0xD0000 is a hole that exits to userspace
    addr = tiny.memory.host_address(0)
    tiny.vm.set_user_memory_region(0, 0, 0, addr)
    tiny.vm.set_user_memory_region(0, 0, 0x80000, addr)
    tiny.load("mmio", rbx=0xD000)
    run_to_halt(tiny, pio, mmio)
    assert dev.writes == [(4, (0x11223345).to_bytes(4, "little")), (12, b"\xcd")]
    regs = tiny.vcpu.get_regs()
    assert regs.rcx & 0xFFFFFFFF == 0x11223345
    assert regs.rsi & 0xFFFF == 0xABCD


def test_pause_kick_resume_a_spinning_guest(tiny):
    tiny.load("spin")
    runner = VcpuThread(tiny.vcpu, *buses())
    runner.start()
    try:
        deadline = time.monotonic() + 5
        while tiny.memory.read_u32(0x600) < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tiny.memory.read_u32(0x600) >= 100
        assert runner.pause()
        frozen = tiny.memory.read_u32(0x600)
        time.sleep(0.1)
        assert tiny.memory.read_u32(0x600) == frozen  # really parked
        assert runner.paused
        runner.resume()
        deadline = time.monotonic() + 5
        while tiny.memory.read_u32(0x600) <= frozen + 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert tiny.memory.read_u32(0x600) > frozen + 100
        kicks = runner.kicks
        runner.kick()
        deadline = time.monotonic() + 5
        while runner.kicks == kicks and time.monotonic() < deadline:
            time.sleep(0.01)
        assert runner.kicks > kicks and runner.is_alive()
    finally:
        reason = runner.stop()
    assert reason is not None and reason.kind is StopKind.STOPPED


def test_guest_requested_exit_code_ends_the_thread(tiny):
    pio, mmio = buses()
    holder: list[VcpuThread] = []

    class DebugExit:
        def read(self, offset: int, size: int) -> bytes:
            return b"\x00" * size

        def write(self, offset: int, data: bytes) -> None:
            holder[0].request_exit(data[0], "debug-exit port")

    pio.register(0xF4, 1, DebugExit())
    tiny.load("pio_loop", rcx=1000, rdx=0xF4)
    runner = VcpuThread(tiny.vcpu, pio, mmio)
    holder.append(runner)
    runner.start()
    reason = runner.join(10)
    assert reason is not None and reason.kind is StopKind.EXIT_CODE
    assert reason.exit_code == 1000 & 0xFF


def test_halt_ends_the_thread_unless_the_hook_continues(tiny):
    pio, mmio = buses()
    seen = []

    def hook(thread, reason):
        seen.append(reason.kind)
        return len(seen) < 2  # continue once after the first HLT, then stop

    tiny.load("regs", rbx=1, rcx=1, rdx=1)
    runner = VcpuThread(tiny.vcpu, pio, mmio, on_stop=hook)
    runner.start()
    reason = runner.join(10)
    assert seen == [StopKind.HALTED, StopKind.HALTED]
    assert reason.kind is StopKind.HALTED


def test_state_moves_to_a_new_vm_and_the_guest_continues(kvm_available):
    total, first = 40, 15
    src_pio, src_mmio = buses()
    src_dev = Recorder()
    src_pio.register(0x10, 1, src_dev)
    with TinyTestVm.create() as src:
        src.load("pio_loop", rcx=total, rdx=0x10)
        disp = ExitDispatcher(src.vcpu.run_map, src_pio, src_mmio)
        while len(src_dev.writes) < first:
            assert src.vcpu.run()
            assert disp.dispatch() == Outcome.CONTINUE
        state = get_vcpu_state(src.vcpu)
        ram = src.memory.read(0, src.memory.size)
    dst_pio, dst_mmio = buses()
    dst_dev = Recorder()
    dst_pio.register(0x10, 1, dst_dev)
    with TinyTestVm.create() as dst:
        dst.memory.write(0, ram)
        set_vcpu_state(dst.vcpu, state)
        disp = ExitDispatcher(dst.vcpu.run_map, dst_pio, dst_mmio)
        while True:
            assert dst.vcpu.run()
            if disp.dispatch():
                break
    values = [d[0] for _, d in src_dev.writes + dst_dev.writes]
    assert values == [n & 0xFF for n in range(total, 0, -1)]
    assert len(dst_dev.writes) == total - first


def test_ioeventfd_signals_without_an_exit_to_python(tiny):
    import os
    pio, mmio = buses()
    dev = Recorder()
    pio.register(0x700, 1, dev)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        tiny.vm.ioeventfd(efd, 0x700, 1, pio=True)
        tiny.load("pio_loop", rcx=3, rdx=0x700)
        disp = run_to_halt(tiny, pio, mmio)
        assert os.eventfd_read(efd) == 3
        assert dev.writes == [] and disp.exits == 1  # only the HLT reached Python
        tiny.vm.ioeventfd(efd, 0x700, 1, pio=True, deassign=True)
    finally:
        os.close(efd)


def test_irqfd_raises_the_pic_line(kvm_available):
    import os
    with TinyTestVm.create(irqchip=True) as tiny:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            tiny.vm.irqfd(efd, 5)
            assert tiny.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & (1 << 5) == 0
            os.eventfd_write(efd, 1)
            deadline = time.monotonic() + 2
            while not tiny.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER).chip.pic.irr & (1 << 5):
                assert time.monotonic() < deadline, "irqfd did not reach the PIC"
                time.sleep(0.01)
            tiny.vm.irqfd(efd, 5, deassign=True)
        finally:
            os.close(efd)
