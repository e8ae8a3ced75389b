"""Register-level tests of the 16550A, following what Linux's 8250 driver does."""
import threading

import pytest

from kvmpy.devices import serial as s
from kvmpy.devices.bus import Bus
from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.errors import StateError


def make():
    irq = RecordingIrqLine()
    out = bytearray()
    uart = s.Serial16550(irq, out.extend, backlog_limit=64)
    bus = Bus("pio", 0x10000)
    bus.register(s.COM1_PORT, s.REGISTER_WINDOW, uart)
    return uart, irq, out, bus


def rd(bus, off):
    return bus.read(s.COM1_PORT + off, 1)[0]


def wr(bus, off, val):
    bus.write(s.COM1_PORT + off, bytes((val,)))


def test_linux_autoconfig_probe():
    uart, irq, out, bus = make()
    # IER scratch test.
    wr(bus, s.IER_DLM, 0)
    assert rd(bus, s.IER_DLM) & 0x0F == 0
    wr(bus, s.IER_DLM, 0x0F)
    assert rd(bus, s.IER_DLM) & 0x0F == 0x0F
    wr(bus, s.IER_DLM, 0)
    # Loopback test: MCR = LOOP | OUT2 | RTS -> MSR high nibble = DCD | CTS.
    wr(bus, s.MCR, s.MCR_LOOP | 0x0A)
    assert rd(bus, s.MSR) & 0xF0 == 0x90
    # Scratch register.
    wr(bus, s.SCR, 0xA5)
    assert rd(bus, s.SCR) == 0xA5
    # FIFO detection: IIR bits 7:6 == 3 means 16550A.
    wr(bus, s.IIR_FCR, s.FCR_ENABLE)
    assert rd(bus, s.IIR_FCR) >> 6 == 3
    # Not a 16750 (IIR bit 5 never set) and no EFR at offset 2 with LCR=0xBF.
    wr(bus, s.LCR, 0xBF)
    assert rd(bus, s.IIR_FCR) != 0
    wr(bus, s.LCR, 0)
    wr(bus, s.IIR_FCR, 0)
    assert rd(bus, s.IIR_FCR) >> 6 == 0
    assert out == b""  # loopback never reached the host


def test_dlab_divisor_latch_does_not_disturb_ier_or_tx():
    uart, irq, out, bus = make()
    wr(bus, s.IER_DLM, 0x05)
    wr(bus, s.LCR, s.LCR_DLAB | 0x03)
    wr(bus, s.RBR_THR_DLL, 0x01)
    wr(bus, s.IER_DLM, 0x02)
    assert rd(bus, s.RBR_THR_DLL) == 0x01 and rd(bus, s.IER_DLM) == 0x02
    wr(bus, s.LCR, 0x03)
    assert rd(bus, s.IER_DLM) == 0x05
    assert out == b""
    st = uart.state()
    assert (st.dll, st.dlm) == (1, 2)


def test_transmit_and_thre_interrupt_raise_and_lower():
    uart, irq, out, bus = make()
    wr(bus, s.MCR, s.MCR_OUT2)
    assert not irq.level
    wr(bus, s.IER_DLM, s.IER_THRE)          # enabling THRE with THR empty raises at once
    assert irq.level
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_THRE
    assert not irq.level                    # reading IIR acknowledged it
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_NO_INT
    for b in b"hi\n":
        assert rd(bus, s.LSR) & s.LSR_THRE
        wr(bus, s.RBR_THR_DLL, b)
    assert out == b"hi\n"
    assert irq.level                        # THR emptied again -> THRE pending again
    wr(bus, s.IER_DLM, 0)
    assert not irq.level
    assert uart.tx_bytes == 3


def test_out2_gates_the_line_but_not_iir():
    uart, irq, out, bus = make()
    wr(bus, s.MCR, 0)
    wr(bus, s.IER_DLM, s.IER_THRE)
    assert not irq.level
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_THRE


def test_receive_with_interrupt_priority_and_trigger():
    uart, irq, out, bus = make()
    wr(bus, s.IIR_FCR, s.FCR_ENABLE | 0x80)   # trigger at 8 bytes
    wr(bus, s.IER_DLM, s.IER_RDA | s.IER_THRE)
    rd(bus, s.IIR_FCR)                        # ack THRE
    assert uart.enqueue_input(b"abc") == 3
    assert irq.level
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_TIMEOUT   # below trigger
    uart.enqueue_input(b"defghijk")
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_RDA
    got = bytearray()
    while rd(bus, s.LSR) & s.LSR_DR:
        got.append(rd(bus, s.RBR_THR_DLL))
    assert got == b"abcdefghijk"
    assert not irq.level
    assert rd(bus, s.RBR_THR_DLL) == 0   # empty read is harmless


def test_loopback_overrun_sets_oe_and_drops():
    uart, irq, out, bus = make()
    wr(bus, s.IIR_FCR, s.FCR_ENABLE | s.FCR_CLEAR_RX)
    wr(bus, s.MCR, s.MCR_LOOP | s.MCR_OUT2)
    wr(bus, s.IER_DLM, s.IER_RLS)
    for i in range(s.RX_FIFO_SIZE + 3):
        wr(bus, s.RBR_THR_DLL, i)
    assert out == b""
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_RLS
    assert not irq.level                 # loopback disconnects the interrupt output
    lsr = rd(bus, s.LSR)
    assert lsr & s.LSR_OE and lsr & s.LSR_DR
    assert not rd(bus, s.LSR) & s.LSR_OE  # cleared by reading LSR
    got = [rd(bus, s.RBR_THR_DLL) for _ in range(s.RX_FIFO_SIZE)]
    assert got == list(range(s.RX_FIFO_SIZE))
    assert not rd(bus, s.LSR) & s.LSR_DR
    assert uart.overruns == 3


def test_non_fifo_mode_holds_one_byte_and_backlog_feeds_it():
    uart, irq, out, bus = make()
    assert uart.enqueue_input(b"xyz") == 3
    assert uart.state().rx_fifo == b"x"
    assert [rd(bus, 0) for _ in range(3)] == list(b"xyz")
    assert not rd(bus, s.LSR) & s.LSR_OE


def test_host_flood_is_bounded_and_backpressured():
    uart, irq, out, bus = make()
    # One byte already moved into the (non-FIFO, 1-byte) receive buffer, so 65 fit in all.
    assert uart.enqueue_input(b"A" * 1000) + uart.enqueue_input(b"A" * 10) == 65
    assert uart.enqueue_input(b"B") == 0
    assert uart.pending_input == 65
    assert not uart.wait_for_input_space(timeout=0.01)
    done = threading.Event()

    def waiter():
        if uart.wait_for_input_space(timeout=5):
            done.set()
    t = threading.Thread(target=waiter)
    t.start()
    rd(bus, 0)
    t.join(5)
    assert done.is_set()
    assert uart.enqueue_input(b"BB") == 1


def test_modem_status_interrupt_on_loopback_change():
    uart, irq, out, bus = make()
    wr(bus, s.IER_DLM, s.IER_MSI)
    wr(bus, s.MCR, s.MCR_LOOP)            # lines drop from DCD|DSR|CTS to nothing
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_MSI
    msr = rd(bus, s.MSR)
    assert msr & (s.MSR_DDCD | s.MSR_DDSR | s.MSR_DCTS) and not msr & 0xF0
    assert rd(bus, s.IIR_FCR) & 0x0F == s.IIR_NO_INT
    wr(bus, s.MCR, s.MCR_LOOP | s.MCR_OUT1)
    wr(bus, s.MCR, s.MCR_LOOP)
    assert rd(bus, s.MSR) & s.MSR_TERI


def test_wide_access_is_split_into_bytes():
    uart, irq, out, bus = make()
    bus.write(s.COM1_PORT + s.SCR - 1, b"\x00\x42")   # MSR (ignored), SCR
    assert rd(bus, s.SCR) == 0x42
    assert len(bus.read(s.COM1_PORT, 4)) == 4


def test_state_round_trip():
    uart, irq, out, bus = make()
    wr(bus, s.IIR_FCR, s.FCR_ENABLE | 0x40)
    wr(bus, s.IER_DLM, s.IER_RDA)
    wr(bus, s.SCR, 0x77)
    wr(bus, s.MCR, s.MCR_OUT2 | s.MCR_DTR)
    uart.enqueue_input(b"q" * 40)
    st = uart.state()
    irq2 = RecordingIrqLine()
    other = s.Serial16550(irq2, backlog_limit=64)
    other.restore(st)
    assert other.state() == st
    assert irq2.level == irq.level == True
    assert other.read(0, 1) == b"q" and other.pending_input == 39


@pytest.mark.parametrize("bad", [
    dict(ier=0x10), dict(mcr=0x20), dict(fcr=0x02), dict(lsr_errors=0x01),
    dict(rx_fifo=b"ab"), dict(fcr=1, rx_fifo=b"x" * 17), dict(backlog=b"x" * 65),
    dict(thr_pending=1), dict(dll=256), dict(scr=-1),
])
def test_restore_rejects_bad_state(bad):
    uart, *_ = make()
    with pytest.raises(StateError):
        uart.restore(s.SerialState(**bad))


def test_linux_startup_thre_retrigger_check():
    # serial8250_do_startup: a UART that does not re-assert THRE after IER is toggled gets
    # flagged UART_BUG_THRE and driven by a timer instead of interrupts. We must pass.
    uart, irq, out, bus = make()
    wr(bus, s.IER_DLM, s.IER_THRE)
    iir1 = rd(bus, s.IIR_FCR)
    wr(bus, s.IER_DLM, 0)
    wr(bus, s.IER_DLM, s.IER_THRE)
    iir = rd(bus, s.IIR_FCR)
    wr(bus, s.IER_DLM, 0)
    assert not iir1 & s.IIR_NO_INT and not iir & s.IIR_NO_INT
    assert rd(bus, s.LSR) & s.LSR_TEMT
    assert not irq.level
