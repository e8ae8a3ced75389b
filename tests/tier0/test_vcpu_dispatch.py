"""Exit dispatch driven by fabricated struct kvm_run exits (no /dev/kvm)."""
from __future__ import annotations

import pytest

from kvmpy.devices.bus import Bus
from kvmpy.ioctl._kvm import ffi, lib
from kvmpy.vcpu.dispatch import ExitDispatcher, Outcome

RUN_BYTES = 4096  # like the real mapping: kvm_run plus room for I/O data
DATA_OFF = 1024


class Recorder:
    def __init__(self, answer: bytes = b""):
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []
        self.answer = answer

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return self.answer[:size] if self.answer else bytes(range(1, size + 1))

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


@pytest.fixture
def env():
    raw = ffi.new("char[]", RUN_BYTES)
    run = ffi.cast("struct kvm_run *", raw)
    buf = ffi.buffer(raw)
    pio, mmio = Bus("pio", 1 << 16), Bus("mmio", 1 << 48)
    port_dev, mmio_dev = Recorder(), Recorder()
    pio.register(0x3F8, 8, port_dev)
    mmio.register(0xFEB00000, 0x1000, mmio_dev)
    yield run, ExitDispatcher(buf, pio, mmio), port_dev, mmio_dev, buf, raw


def io_exit(run, buf, direction, size, port, count, data=b""):
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction, run.io.size, run.io.port, run.io.count = direction, size, port, count
    run.io.data_offset = DATA_OFF
    buf[DATA_OFF:DATA_OFF + len(data)] = data


def test_out_goes_to_the_device_at_its_offset(env):
    run, disp, dev, _, buf, _ = env
    io_exit(run, buf, lib.KVM_EXIT_IO_OUT, 1, 0x3F9, 1, b"A")
    assert disp.dispatch() == Outcome.CONTINUE
    assert dev.writes == [(1, b"A")]


def test_in_answer_lands_in_the_data_buffer(env):
    run, disp, dev, _, buf, _ = env
    io_exit(run, buf, lib.KVM_EXIT_IO_IN, 2, 0x3FA, 1)
    assert disp.dispatch() == Outcome.CONTINUE
    assert dev.reads == [(2, 2)]
    assert buf[DATA_OFF:DATA_OFF + 2] == b"\x01\x02"


def test_string_out_splits_into_count_writes(env):
    run, disp, dev, _, buf, _ = env
    io_exit(run, buf, lib.KVM_EXIT_IO_OUT, 2, 0x3F8, 3, b"aabbcc")
    disp.dispatch()
    assert dev.writes == [(0, b"aa"), (0, b"bb"), (0, b"cc")]


def test_string_in_fills_count_slots(env):
    run, disp, dev, _, buf, _ = env
    dev.answer = b"\x7f"
    io_exit(run, buf, lib.KVM_EXIT_IO_IN, 1, 0x3F8, 4)
    disp.dispatch()
    assert buf[DATA_OFF:DATA_OFF + 4] == b"\x7f" * 4
    assert len(dev.reads) == 4


def test_unclaimed_in_reads_all_ones(env):
    run, disp, _, _, buf, _ = env
    io_exit(run, buf, lib.KVM_EXIT_IO_IN, 4, 0x80, 1)
    disp.dispatch()
    assert buf[DATA_OFF:DATA_OFF + 4] == b"\xff" * 4


def test_short_device_answer_is_padded_not_overflowing(env):
    run, disp, dev, _, buf, _ = env
    dev.answer = b"\x11"
    buf[DATA_OFF + 1:DATA_OFF + 8] = b"\xaa" * 7
    io_exit(run, buf, lib.KVM_EXIT_IO_IN, 4, 0x3F8, 1)
    disp.dispatch()
    assert buf[DATA_OFF:DATA_OFF + 8] == b"\x11\xff\xff\xff" + b"\xaa" * 4


@pytest.mark.parametrize("size,count,offset", [(3, 1, DATA_OFF), (1, 0, DATA_OFF), (4, 1000, DATA_OFF),
                                               (1, 1, RUN_BYTES)])
def test_malformed_io_exits_are_dropped(env, size, count, offset):
    run, disp, dev, _, buf, _ = env
    io_exit(run, buf, lib.KVM_EXIT_IO_OUT, size, 0x3F8, count)
    run.io.data_offset = offset
    assert disp.dispatch() == Outcome.CONTINUE
    assert dev.writes == []
    assert disp.bad_exits == 1


def test_mmio_write_and_read(env):
    run, disp, _, dev, buf, _ = env
    run.exit_reason = lib.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEB00010, 4, 1
    for i, b in enumerate(b"\x01\x02\x03\x04"):
        run.mmio.data[i] = b
    assert disp.dispatch() == Outcome.CONTINUE
    assert dev.writes == [(0x10, b"\x01\x02\x03\x04")]
    dev.answer = b"\xde\xad\xbe\xef\x01\x02\x03\x04"
    run.mmio.is_write, run.mmio.len = 0, 8
    disp.dispatch()
    assert bytes(run.mmio.data) == b"\xde\xad\xbe\xef\x01\x02\x03\x04"


def test_mmio_bad_length_is_dropped(env):
    run, disp, _, dev, _, _ = env
    run.exit_reason = lib.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xFEB00000, 9, 1
    assert disp.dispatch() == Outcome.CONTINUE
    assert dev.writes == [] and disp.bad_exits == 1


@pytest.mark.parametrize("reason,outcome", [
    (lib.KVM_EXIT_HLT, Outcome.HALT), (lib.KVM_EXIT_SHUTDOWN, Outcome.SHUTDOWN),
    (lib.KVM_EXIT_INTR, Outcome.INTERRUPTED), (lib.KVM_EXIT_DEBUG, Outcome.DEBUG),
    (lib.KVM_EXIT_IRQ_WINDOW_OPEN, Outcome.CONTINUE), (12345, Outcome.UNHANDLED)])
def test_simple_exit_reasons(env, reason, outcome):
    run, disp, *_ = env
    run.exit_reason = reason
    assert disp.dispatch() == outcome


@pytest.mark.parametrize("ev,outcome", [(lib.KVM_SYSTEM_EVENT_SHUTDOWN, Outcome.POWEROFF),
                                        (lib.KVM_SYSTEM_EVENT_RESET, Outcome.RESET),
                                        (lib.KVM_SYSTEM_EVENT_CRASH, Outcome.CRASH), (99, Outcome.UNHANDLED)])
def test_system_events(env, ev, outcome):
    run, disp, *_ = env
    run.exit_reason = lib.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type = ev
    run.system_event.ndata = 1000  # hostile/garbage count is clamped
    assert disp.dispatch() == outcome


def test_fail_entry_and_internal_error_carry_details(env):
    run, disp, *_ = env
    run.exit_reason = lib.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason = 0x21
    run.fail_entry.cpu = 3
    assert disp.dispatch() == Outcome.FAIL_ENTRY
    assert "0x21" in disp.detail and "cpu 3" in disp.detail
    run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror = lib.KVM_INTERNAL_ERROR_EMULATION
    run.internal.ndata = 99
    run.internal.data[0] = 0xABC
    assert disp.dispatch() == Outcome.INTERNAL_ERROR
    assert "0xabc" in disp.detail
