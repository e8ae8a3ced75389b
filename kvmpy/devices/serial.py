"""8250/16550A UART, as COM1 (port 0x3f8, IRQ 4) on a PC.

A pure state machine on an 8-register window: the guest's console writes one byte per port
exit, so the hot path (THR write, LSR read) is a lock, a branch and a call. Transmission is
instantaneous (THR is always empty again after a write), which is what Linux's 8250 driver and
its early console expect.

Input has two stages so a host-side flood never costs unbounded memory or silent loss:
`enqueue_input()` fills a bounded host backlog (returns how much it took), and bytes move from
the backlog into the 16-byte receive FIFO as the guest drains it. Overrun (LSR.OE) therefore
only happens in loopback mode, where the guest itself overfills the FIFO, as on hardware.

Interrupt line: level, high while IIR reports a pending interrupt, gated by MCR.OUT2 as on PC
boards, and disconnected in loopback mode (the 16550's OUT2 pin is forced inactive there).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable, ClassVar

from kvmpy.devices.irq import IrqLine
from kvmpy.errors import StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import check_bytes, check_int, expect_state, versioned

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

COM1_PORT = 0x3F8
COM1_IRQ = 4
REGISTER_WINDOW = 8
RX_FIFO_SIZE = 16
DEFAULT_BACKLOG = 4096

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

IER_RDA = 0x01      # received data available
IER_THRE = 0x02     # transmitter holding register empty
IER_RLS = 0x04      # receiver line status
IER_MSI = 0x08      # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_RLS = 0x06
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_KEEP = 0xC9     # enable, DMA mode, trigger level: the bits that persist
FCR_TRIGGER_BYTES = (1, 4, 8, 14)

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_FIFO_ERR = 0x80
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI | LSR_FIFO_ERR

MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_DELTAS = 0x0F
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
# With no real modem behind us, report carrier, data-set-ready and clear-to-send.
MSR_IDLE_LINES = MSR_DCD | MSR_DSR | MSR_CTS

OutputSink = Callable[[bytes], object]


@versioned("serial-16550", 1)
@dataclass
class SerialState:
    """Everything a 16550 needs to resume where it was (registers, FIFO, host backlog)."""
    dll: int = 0x0C          # 9600 baud with the PC's 1.8432 MHz clock
    dlm: int = 0
    ier: int = 0
    lcr: int = 0x03          # 8N1
    mcr: int = MCR_OUT2
    scr: int = 0
    fcr: int = 0
    lsr_errors: int = 0
    msr_deltas: int = 0
    thr_pending: bool = False
    rx_fifo: bytes = b""
    backlog: bytes = b""

    def validate(self, backlog_limit: int) -> None:
        """Raise StateError unless every register holds only bits the guest could have set and
        the FIFO/backlog fit this UART (the state may come from an untrusted stream)."""
        what = "serial state"
        for name, mask in (("dll", 0xFF), ("dlm", 0xFF), ("ier", IER_MASK), ("lcr", 0xFF),
                           ("mcr", MCR_MASK), ("scr", 0xFF), ("fcr", FCR_KEEP),
                           ("lsr_errors", LSR_ERRORS), ("msr_deltas", MSR_DELTAS)):
            value = check_int(what, name, getattr(self, name), bits=8)
            if value & ~mask:
                raise StateError(f"restoring {what}", detail=f"{name}={value:#x} has reserved bits")
        if not isinstance(self.thr_pending, bool):
            raise StateError(f"restoring {what}", detail="thr_pending is not a bool")
        capacity = RX_FIFO_SIZE if self.fcr & FCR_ENABLE else 1
        check_bytes(what, "rx_fifo", self.rx_fifo, max_size=capacity)
        check_bytes(what, "backlog", self.backlog, max_size=backlog_limit)


class Serial16550:
    """One 16550A UART. Register it on the port-I/O bus with length `REGISTER_WINDOW`."""

    DEVICE_KIND: ClassVar[str] = "isa-serial"

    def __init__(self, irq: IrqLine, output: OutputSink | None = None, *,
                 backlog_limit: int = DEFAULT_BACKLOG, name: str = "com1"):
        if backlog_limit < 1:
            raise ValueError("backlog_limit must be >= 1")
        self.name = name
        self.irq = irq
        self.output: OutputSink = output if output is not None else (lambda data: None)
        self.backlog_limit = backlog_limit
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._irq_level = False
        self.tx_bytes = 0
        self.overruns = 0
        self._load(SerialState())

    def __repr__(self) -> str:
        return f"Serial16550({self.name})"

    # -- host side ---------------------------------------------------------------------------

    def enqueue_input(self, data: bytes) -> int:
        """Queue host bytes for the guest; returns how many were accepted (the rest: retry
        after `wait_for_input_space`)."""
        with self._lock:
            free = self.backlog_limit - len(self._backlog)
            taken = data[:max(free, 0)]
            if taken:
                self._backlog += taken
                self._refill_rx()
                self._update_irq()
            return len(taken)

    def wait_for_input_space(self, timeout: float | None = None) -> bool:
        """Block until the backlog has room (the guest read something) or `timeout` passes."""
        with self._space:
            return self._space.wait_for(lambda: len(self._backlog) < self.backlog_limit, timeout)

    @property
    def pending_input(self) -> int:
        """Bytes waiting for the guest (receive FIFO plus host backlog)."""
        with self._lock:
            return len(self._rx) + len(self._backlog)

    # -- guest side --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        # An ISA bus splits wide accesses to an 8-bit device into byte accesses.
        with self._lock:
            if size == 1:
                return bytes((self._read_register(offset),))
            return bytes(self._read_register(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            for i, value in enumerate(data):
                self._write_register(offset + i, value)

    def _read_register(self, offset: int) -> int:
        if offset == RBR_THR_DLL:
            if self._lcr & LCR_DLAB:
                return self._dll
            return self._pop_rx()
        if offset == LSR:
            value = self._lsr()
            if self._lsr_errors:
                self._lsr_errors = 0
                self._update_irq()
            return value
        if offset == IIR_FCR:
            iir = self._iir()
            if iir & 0x0F == IIR_THRE:
                # Reading IIR while it reports THRE acknowledges that interrupt.
                self._thr_pending = False
                self._update_irq()
            return iir
        if offset == IER_DLM:
            return self._dlm if self._lcr & LCR_DLAB else self._ier
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == MSR:
            value = self._modem_lines() | self._msr_deltas
            if self._msr_deltas:
                self._msr_deltas = 0
                self._update_irq()
            return value
        if offset == SCR:
            return self._scr
        _guest_log.debug((self.name, "read"), "%s: read of offset %#x outside the UART",
                         self.name, offset)
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        if offset == RBR_THR_DLL:
            if self._lcr & LCR_DLAB:
                self._dll = value
                return
            self._transmit(value)
        elif offset == IER_DLM:
            if self._lcr & LCR_DLAB:
                self._dlm = value
                return
            old = self._ier
            self._ier = value & IER_MASK
            if (old ^ self._ier) & IER_THRE:
                # Enabling the THRE interrupt while THR is empty raises it at once; Linux's
                # 8250 driver (and Windows) rely on this to start transmitting.
                self._thr_pending = bool(self._ier & IER_THRE)
            self._update_irq()
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value & MCR_MASK)
        elif offset == SCR:
            self._scr = value
        else:
            # LSR/MSR are read-only (writes are a factory test mode); anything else is not ours.
            _guest_log.debug((self.name, "write"), "%s: ignored write %#x to offset %#x",
                             self.name, value, offset)

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            self._push_rx(value)
        else:
            self.tx_bytes += 1
            self.output(bytes((value,)))
        # The byte leaves at once, so THR is empty again: THRE interrupt is pending anew.
        self._thr_pending = True
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        if (value ^ self._fcr) & FCR_ENABLE:
            self._rx.clear()   # switching FIFO mode resets both FIFOs
        if value & FCR_CLEAR_RX:
            self._rx.clear()
            self._lsr_errors &= ~LSR_FIFO_ERR
        self._fcr = value & FCR_KEEP
        self._refill_rx()
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        before = self._modem_lines()
        was_loop = self._mcr & MCR_LOOP
        self._mcr = value
        after = self._modem_lines()
        changed = before ^ after
        if changed & MSR_CTS:
            self._msr_deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._msr_deltas |= MSR_DDSR
        if before & MSR_RI and not after & MSR_RI:
            self._msr_deltas |= MSR_TERI
        if changed & MSR_DCD:
            self._msr_deltas |= MSR_DDCD
        if was_loop and not value & MCR_LOOP:
            self._refill_rx()
        self._update_irq()

    # -- internals (lock held) ---------------------------------------------------------------

    def _modem_lines(self) -> int:
        mcr = self._mcr
        if not mcr & MCR_LOOP:
            return MSR_IDLE_LINES
        # Loopback wires the modem outputs back to the inputs: RTS->CTS, DTR->DSR,
        # OUT1->RI, OUT2->DCD. Linux's probe checks MSR & 0xF0 == 0x90 for MCR = LOOP|OUT2|RTS.
        lines = 0
        if mcr & MCR_RTS:
            lines |= MSR_CTS
        if mcr & MCR_DTR:
            lines |= MSR_DSR
        if mcr & MCR_OUT1:
            lines |= MSR_RI
        if mcr & MCR_OUT2:
            lines |= MSR_DCD
        return lines

    def _rx_capacity(self) -> int:
        return RX_FIFO_SIZE if self._fcr & FCR_ENABLE else 1

    def _lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= LSR_DR
        return value

    def _iir(self) -> int:
        ier = self._ier
        base = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE else 0
        if ier & IER_RLS and self._lsr_errors & (LSR_OE | LSR_PE | LSR_FE | LSR_BI):
            return base | IIR_RLS
        if ier & IER_RDA and self._rx:
            if self._fcr & FCR_ENABLE and \
                    len(self._rx) < FCR_TRIGGER_BYTES[self._fcr >> 6]:
                # Below the trigger level the real chip waits 4 character times and then
                # reports a timeout; we do not model time, so the timeout is immediate.
                return base | IIR_TIMEOUT
            return base | IIR_RDA
        if ier & IER_THRE and self._thr_pending:
            return base | IIR_THRE
        if ier & IER_MSI and self._msr_deltas:
            return base | IIR_MSI
        return base | IIR_NO_INT

    def _line_level(self) -> bool:
        return not self._iir() & IIR_NO_INT and self._mcr & (MCR_OUT2 | MCR_LOOP) == MCR_OUT2

    def _update_irq(self) -> None:
        level = self._line_level()
        if level != self._irq_level:
            self._irq_level = level
            self.irq.set_level(level)

    def _push_rx(self, value: int) -> None:
        if len(self._rx) >= self._rx_capacity():
            self._lsr_errors |= LSR_OE
            self.overruns += 1
            return
        self._rx.append(value)

    def _refill_rx(self) -> None:
        if self._mcr & MCR_LOOP or not self._backlog:
            return
        room = self._rx_capacity() - len(self._rx)
        if room > 0:
            self._rx += self._backlog[:room]
            del self._backlog[:room]
            self._space.notify_all()

    def _pop_rx(self) -> int:
        if not self._rx:
            return 0
        value = self._rx.pop(0)
        self._refill_rx()
        self._update_irq()
        return value

    # -- state -------------------------------------------------------------------------------

    def state(self) -> SerialState:
        with self._lock:
            return SerialState(dll=self._dll, dlm=self._dlm, ier=self._ier, lcr=self._lcr,
                               mcr=self._mcr, scr=self._scr, fcr=self._fcr,
                               lsr_errors=self._lsr_errors, msr_deltas=self._msr_deltas,
                               thr_pending=self._thr_pending, rx_fifo=bytes(self._rx),
                               backlog=bytes(self._backlog))

    def check_state(self, state: object) -> SerialState:
        """Validate `state` for this UART (its backlog limit) without touching it."""
        checked = expect_state(state, SerialState, "serial state")
        checked.validate(self.backlog_limit)
        return checked

    def restore(self, state: SerialState) -> None:
        state = self.check_state(state)
        with self._lock:
            self._load(state)
            self._space.notify_all()

    def _load(self, state: SerialState) -> None:
        self._dll, self._dlm, self._ier = state.dll, state.dlm, state.ier
        self._lcr, self._mcr, self._scr, self._fcr = state.lcr, state.mcr, state.scr, state.fcr
        self._lsr_errors, self._msr_deltas = state.lsr_errors, state.msr_deltas
        self._thr_pending = state.thr_pending
        self._rx = bytearray(state.rx_fifo)
        self._backlog = bytearray(state.backlog)
        level = self._line_level()
        self._irq_level = level
        self.irq.set_level(level)
