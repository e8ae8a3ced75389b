"""i8042 PS/2 controller (data port 0x60, status/command port 0x64), with a minimal keyboard
and mouse behind it.

Enough for Linux's i8042 driver (flush, self test, CTR read/write, AUX loopback, interface
tests), its atkbd/psmouse probes (ACK, reset and identify replies), and for the reset paths
(command 0xFE, or writing the output port with bit 0 clear) which call `on_reset()`.
Nothing is typed on the keyboard unless the host calls `push_keyboard_data()`.

The two ports are not adjacent (0x61 between them belongs to the speaker/PIT), so register
`data_port` at 0x60 and `command_port` at 0x64, each with length 1. Both go through this
object, whose own `read/write` take offset 0 (data) or 4 (status/command).

Interrupts are level, like QEMU: IRQ 1 is high while the byte at the head of the output queue
came from the keyboard and CTR bit 0 is set; IRQ 12 likewise for the mouse and CTR bit 1.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, ClassVar

from kvmpy.devices.irq import IrqLine, NullIrqLine
from kvmpy.errors import StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import expect_state, versioned

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
KBD_IRQ = 1
AUX_IRQ = 12
DATA_OFFSET = 0
COMMAND_OFFSET = 4
OUTPUT_QUEUE_LIMIT = 16

STATUS_OBF = 0x01
STATUS_SYS = 0x04
STATUS_CMD = 0x08
STATUS_UNLOCKED = 0x10
STATUS_AUX_OBF = 0x20

CTR_KBD_INT = 0x01
CTR_AUX_INT = 0x02
CTR_SYS = 0x04
CTR_KBD_DISABLE = 0x10
CTR_AUX_DISABLE = 0x20
CTR_XLATE = 0x40

OUTPORT_RESET = 0x01      # 0 = hold the CPU in reset
OUTPORT_A20 = 0x02

ACK = 0xFA
BAT_OK = 0xAA
# Controller commands that take a data byte on port 0x60 next.
_CMD_WITH_ARG = {0xD1, 0xD2, 0xD3, 0xD4} | set(range(0x60, 0x80))
# Keyboard / mouse commands that take an argument byte next.
_KBD_WITH_ARG = {0xED, 0xF0, 0xF3}
_AUX_WITH_ARG = {0xE8, 0xF3}


@versioned("i8042", 1)
@dataclass
class I8042State:
    """Controller, keyboard and mouse state; `output` is the queue of (byte, from_aux). This is
    the live state: the controller keeps one of these and mutates it."""
    command_byte: int = CTR_KBD_INT | CTR_AUX_INT | CTR_SYS | CTR_XLATE
    output_port: int = OUTPORT_RESET | OUTPORT_A20
    last_was_command: bool = False
    pending_command: int = 0       # controller command waiting for its data byte, or 0
    keyboard_pending: int = 0      # keyboard command waiting for its argument, or 0
    aux_pending: int = 0           # mouse command waiting for its argument, or 0
    keyboard_scanning: bool = True
    scancode_set: int = 2
    aux_streaming: bool = False
    last_output: int = 0
    output: list[tuple[int, bool]] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("command_byte", "output_port", "pending_command", "keyboard_pending",
                     "aux_pending", "last_output"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= 0xFF:
                raise StateError("restoring i8042 state", detail=f"{name}={value!r}")
        if self.pending_command and self.pending_command not in _CMD_WITH_ARG:
            raise StateError("restoring i8042 state", detail="bad pending_command")
        if self.keyboard_pending not in _KBD_WITH_ARG | {0}:
            raise StateError("restoring i8042 state", detail="bad keyboard_pending")
        if self.aux_pending not in _AUX_WITH_ARG | {0}:
            raise StateError("restoring i8042 state", detail="bad aux_pending")
        if type(self.scancode_set) is not int or self.scancode_set not in (1, 2, 3):
            raise StateError("restoring i8042 state", detail="scancode_set not 1..3")
        for name in ("last_was_command", "keyboard_scanning", "aux_streaming"):
            if not isinstance(getattr(self, name), bool):
                raise StateError("restoring i8042 state", detail=f"{name} is not a bool")
        if not isinstance(self.output, (list, tuple)) or len(self.output) > OUTPUT_QUEUE_LIMIT or any(
                not isinstance(e, (tuple, list)) or len(e) != 2 or type(e[0]) is not int
                or not 0 <= e[0] <= 0xFF or not isinstance(e[1], bool) for e in self.output):
            raise StateError("restoring i8042 state", detail="bad output queue")


class _PortView:
    """One of the controller's two ports, as a separate bus device."""

    def __init__(self, controller: "I8042", offset: int):
        self._controller = controller
        self._offset = offset

    def read(self, offset: int, size: int) -> bytes:
        return self._controller.read(self._offset + offset, size)

    def write(self, offset: int, data: bytes) -> None:
        self._controller.write(self._offset + offset, data)

    def __repr__(self) -> str:
        return f"{self._controller!r}@{self._offset}"


class I8042:
    """The controller; its two ports are the bus devices `data_port` and `command_port`."""

    DEVICE_KIND: ClassVar[str] = "i8042"

    def __init__(self, on_reset: Callable[[], None], kbd_irq: IrqLine | None = None,
                 aux_irq: IrqLine | None = None):
        self.on_reset = on_reset
        self.kbd_irq = kbd_irq or NullIrqLine()
        self.aux_irq = aux_irq or NullIrqLine()
        self.data_port = _PortView(self, DATA_OFFSET)
        self.command_port = _PortView(self, COMMAND_OFFSET)
        self._lock = threading.Lock()
        self._levels = (False, False)
        self._load(I8042State())

    def __repr__(self) -> str:
        return "I8042()"

    @property
    def a20_enabled(self) -> bool:
        return bool(self._s.output_port & OUTPORT_A20)

    def push_keyboard_data(self, data: bytes) -> int:
        """Host-side keystrokes (already scancodes). Returns how many bytes were queued."""
        with self._lock:
            if not self._s.keyboard_scanning or self._s.command_byte & CTR_KBD_DISABLE:
                return 0
            room = OUTPUT_QUEUE_LIMIT - len(self._s.output)
            for byte in data[:room]:
                self._s.output.append((byte, False))
            self._update_irq()
            return min(len(data), max(room, 0))

    # -- guest side --------------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            if offset == DATA_OFFSET:
                value = self._read_data()
            elif offset == COMMAND_OFFSET:
                value = self._status()
            else:
                value = 0xFF
            return bytes((value,)) + b"\xff" * (size - 1)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            if offset == DATA_OFFSET:
                reset = self._write_data(data[0])
            elif offset == COMMAND_OFFSET:
                reset = self._write_command(data[0])
            else:
                reset = False
        if reset:
            log.info("guest requested reset through the i8042")
            self.on_reset()

    def _status(self) -> int:
        s = self._s
        value = STATUS_UNLOCKED
        if s.output:
            value |= STATUS_OBF
            if s.output[0][1]:
                value |= STATUS_AUX_OBF
        if s.command_byte & CTR_SYS:
            value |= STATUS_SYS
        if s.last_was_command:
            value |= STATUS_CMD
        return value

    def _read_data(self) -> int:
        s = self._s
        if s.output:
            s.last_output = s.output.pop(0)[0]
            self._update_irq()
        return s.last_output   # an empty buffer re-reads the last byte, as hardware does

    def _queue(self, *values: int, aux: bool = False) -> None:
        for value in values:
            if len(self._s.output) >= OUTPUT_QUEUE_LIMIT:
                _guest_log.debug(("i8042", "full"), "i8042 output queue full, dropping")
                break
            self._s.output.append((value, aux))
        self._update_irq()

    def _write_command(self, cmd: int) -> bool:
        s = self._s
        s.last_was_command = True
        s.pending_command = 0
        if cmd in _CMD_WITH_ARG:
            s.pending_command = cmd
        elif 0x20 <= cmd <= 0x3F:
            self._queue(s.command_byte if cmd == 0x20 else 0)
        elif cmd == 0xA7:
            s.command_byte |= CTR_AUX_DISABLE
        elif cmd == 0xA8:
            s.command_byte &= ~CTR_AUX_DISABLE
        elif cmd in (0xA9, 0xAB):       # aux / keyboard interface test: 0 = no error
            self._queue(0x00)
        elif cmd == 0xAA:               # controller self test
            s.command_byte |= CTR_SYS
            self._queue(0x55)
        elif cmd == 0xAD:
            s.command_byte |= CTR_KBD_DISABLE
        elif cmd == 0xAE:
            s.command_byte &= ~CTR_KBD_DISABLE
        elif cmd == 0xC0:               # input port: keyboard not inhibited
            self._queue(0x80)
        elif cmd == 0xD0:
            self._queue(self._output_port_value())
        elif cmd == 0xDD:
            s.output_port &= ~OUTPORT_A20
        elif cmd == 0xDF:
            s.output_port |= OUTPORT_A20
        elif cmd == 0xE0:               # test inputs
            self._queue(0x00)
        elif cmd >= 0xF0:               # pulse output lines low; bit 0 low = pulse reset
            return not cmd & 0x01
        else:
            _guest_log.debug(("i8042", "cmd"), "i8042: unknown controller command %#x", cmd)
        self._update_irq()
        return False

    def _output_port_value(self) -> int:
        value = self._s.output_port
        if self._s.output:
            value |= 0x20 if self._s.output[0][1] else 0x10
        return value

    def _write_data(self, value: int) -> bool:
        s = self._s
        s.last_was_command = False
        cmd, s.pending_command = s.pending_command, 0
        if cmd == 0:
            self._keyboard_command(value)
        elif 0x60 <= cmd <= 0x7F:
            if cmd == 0x60:
                s.command_byte = value
                self._update_irq()
        elif cmd == 0xD1:
            s.output_port = value
            return not value & OUTPORT_RESET
        elif cmd == 0xD2:
            self._queue(value)
        elif cmd == 0xD3:
            self._queue(value, aux=True)
        elif cmd == 0xD4:
            self._aux_command(value)
        return False

    def _keyboard_command(self, value: int) -> None:
        s = self._s
        pending, s.keyboard_pending = s.keyboard_pending, 0
        if pending == 0xF0:
            if value == 0:
                self._queue(ACK, s.scancode_set)
                return
            if value in (1, 2, 3):
                s.scancode_set = value
        if pending:
            self._queue(ACK)            # argument of LEDs / typematic / scancode set
            return
        if value in _KBD_WITH_ARG:
            s.keyboard_pending = value
            self._queue(ACK)
        elif value == 0xFF:             # reset: ACK, then basic assurance test passed
            s.keyboard_scanning, s.scancode_set = True, 2
            self._queue(ACK, BAT_OK)
        elif value == 0xF2:             # identify: MF2 keyboard (translated ID if XLATE)
            self._queue(ACK, 0xAB, 0x41 if s.command_byte & CTR_XLATE else 0x83)
        elif value == 0xEE:             # echo
            self._queue(0xEE)
        elif value in (0xF4, 0xF6):
            s.keyboard_scanning = True
            self._queue(ACK)
        elif value == 0xF5:
            s.keyboard_scanning = False
            self._queue(ACK)
        else:
            self._queue(ACK)

    def _aux_command(self, value: int) -> None:
        s = self._s
        if s.aux_pending:
            s.aux_pending = 0
            self._queue(ACK, aux=True)
        elif value in _AUX_WITH_ARG:
            s.aux_pending = value
            self._queue(ACK, aux=True)
        elif value == 0xFF:             # reset: ACK, BAT passed, device ID 0 (plain mouse)
            s.aux_streaming = False
            self._queue(ACK, BAT_OK, 0x00, aux=True)
        elif value == 0xF2:
            self._queue(ACK, 0x00, aux=True)
        elif value == 0xE9:             # status: stream off, resolution 2, 100 samples/s
            self._queue(ACK, 0x00, 0x02, 0x64, aux=True)
        elif value == 0xEB:             # read data: an empty movement packet
            self._queue(ACK, 0x08, 0x00, 0x00, aux=True)
        else:
            if value == 0xF4:
                s.aux_streaming = True
            elif value in (0xF5, 0xF6):
                s.aux_streaming = False
            self._queue(ACK, aux=True)

    def _wanted_levels(self) -> tuple[bool, bool]:
        s = self._s
        head_aux = s.output[0][1] if s.output else None
        return (head_aux is False and bool(s.command_byte & CTR_KBD_INT),
                head_aux is True and bool(s.command_byte & CTR_AUX_INT))

    def _update_irq(self) -> None:
        levels = self._wanted_levels()
        if levels != self._levels:
            if levels[0] != self._levels[0]:
                self.kbd_irq.set_level(levels[0])
            if levels[1] != self._levels[1]:
                self.aux_irq.set_level(levels[1])
            self._levels = levels

    # -- state -------------------------------------------------------------------------------

    def state(self) -> I8042State:
        with self._lock:
            s = self._s
            return I8042State(**{**vars(s), "output": list(s.output)})

    def check_state(self, state: object) -> I8042State:
        """Validate `state` without touching the controller."""
        checked = expect_state(state, I8042State, "i8042 state")
        checked.validate()
        return checked

    def restore(self, state: I8042State) -> None:
        state = self.check_state(state)
        with self._lock:
            self._load(state)

    def _load(self, state: I8042State) -> None:
        # A copy, so the caller's value never aliases the live state; entries as tuples (a
        # stream codec may hand them back as lists).
        self._s = I8042State(**{**vars(state), "output": [(e[0], e[1]) for e in state.output]})
        self._levels = self._wanted_levels()
        self.kbd_irq.set_level(self._levels[0])
        self.aux_irq.set_level(self._levels[1])
