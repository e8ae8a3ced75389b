"""i8042: Linux's probe sequence, keyboard/mouse replies, reset paths, interrupts, state."""
import pytest

from kvmpy.devices import i8042 as k
from kvmpy.devices.bus import Bus
from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.errors import StateError


def make():
    resets = []
    kbd, aux = RecordingIrqLine(), RecordingIrqLine()
    dev = k.I8042(lambda: resets.append(1), kbd, aux)
    bus = Bus("pio", 0x10000)
    bus.register(k.I8042_DATA_PORT, 1, dev.data_port)
    bus.register(k.I8042_COMMAND_PORT, 1, dev.command_port)
    return dev, bus, kbd, aux, resets


def cmd(bus, c, arg=None):
    bus.write(0x64, bytes((c,)))
    if arg is not None:
        bus.write(0x60, bytes((arg,)))


def status(bus):
    return bus.read(0x64, 1)[0]


def drain(bus):
    out = []
    while status(bus) & k.STATUS_OBF:
        out.append(bus.read(0x60, 1)[0])
    return out


def test_linux_controller_probe():
    dev, bus, kbd, aux, resets = make()
    assert drain(bus) == []
    cmd(bus, 0xAA)
    assert drain(bus) == [0x55]
    cmd(bus, 0x20)
    ctr = drain(bus)[0]
    assert ctr & k.CTR_XLATE
    cmd(bus, 0x60, ctr & ~(k.CTR_KBD_INT | k.CTR_AUX_INT))   # driver masks IRQs first
    cmd(bus, 0x20)
    assert drain(bus) == [ctr & ~3]
    # AUX loopback comes back flagged as mouse data.
    cmd(bus, 0xD3, 0x5A)
    assert status(bus) & k.STATUS_AUX_OBF
    assert drain(bus) == [0x5A]
    cmd(bus, 0xA9)
    assert drain(bus) == [0x00]
    cmd(bus, 0xAB)
    assert drain(bus) == [0x00]
    cmd(bus, 0xA7)
    cmd(bus, 0x20)
    assert drain(bus)[0] & k.CTR_AUX_DISABLE
    assert resets == []


def test_interrupt_lines_follow_ctr_and_queue_head():
    dev, bus, kbd, aux, resets = make()
    cmd(bus, 0x60, k.CTR_KBD_INT | k.CTR_AUX_INT)
    cmd(bus, 0xD3, 0xA5)                 # i8042_check_aux's IRQ test
    assert aux.level and not kbd.level
    bus.read(0x60, 1)
    assert not aux.level
    bus.write(0x60, b"\xf2")             # keyboard identify
    assert kbd.level
    assert drain(bus) == [0xFA, 0xAB, 0x83]   # no XLATE -> raw ID
    assert not kbd.level
    cmd(bus, 0x60, 0)                    # interrupts off: data still queued, no line
    bus.write(0x60, b"\xee")
    assert status(bus) & k.STATUS_OBF and not kbd.level
    assert drain(bus) == [0xEE]


def test_keyboard_commands_ack():
    dev, bus, *_ = make()
    bus.write(0x60, b"\xff")
    assert drain(bus) == [0xFA, 0xAA]
    bus.write(0x60, b"\xf2")
    assert drain(bus) == [0xFA, 0xAB, 0x41]   # translated ID with XLATE set
    bus.write(0x60, b"\xed")
    bus.write(0x60, b"\x07")
    assert drain(bus) == [0xFA, 0xFA]
    bus.write(0x60, b"\xf0")
    bus.write(0x60, b"\x00")
    assert drain(bus) == [0xFA, 0xFA, 2]
    bus.write(0x60, b"\xf5")
    assert drain(bus) == [0xFA]
    assert dev.push_keyboard_data(b"\x1e") == 0   # scanning disabled
    bus.write(0x60, b"\xf4")
    assert drain(bus) == [0xFA]
    assert dev.push_keyboard_data(b"\x1e\x9e") == 2
    assert drain(bus) == [0x1E, 0x9E]
    assert bus.read(0x60, 1) == b"\x9e"          # empty buffer re-reads last byte


def test_mouse_commands_through_d4():
    dev, bus, *_ = make()
    cmd(bus, 0xD4, 0xFF)
    assert drain(bus) == [0xFA, 0xAA, 0x00]
    cmd(bus, 0xD4, 0xF3)
    cmd(bus, 0xD4, 200)
    assert drain(bus) == [0xFA, 0xFA]
    cmd(bus, 0xD4, 0xF2)
    assert drain(bus) == [0xFA, 0x00]
    cmd(bus, 0xD4, 0xF4)
    assert drain(bus) == [0xFA] and dev.state().aux_streaming


@pytest.mark.parametrize("sequence", [[(0xFE, None)], [(0xF0, None)], [(0xD1, 0x02)]])
def test_reset_paths_call_on_reset(sequence):
    dev, bus, kbd, aux, resets = make()
    for c, arg in sequence:
        cmd(bus, c, arg)
    assert resets == [1]


def test_non_reset_pulses_and_output_port():
    dev, bus, kbd, aux, resets = make()
    cmd(bus, 0xFF)                       # pulse nothing
    cmd(bus, 0xD1, 0x01)                 # reset line high, A20 off
    assert resets == [] and not dev.a20_enabled
    cmd(bus, 0xDF)
    assert dev.a20_enabled
    cmd(bus, 0xD0)
    assert drain(bus) == [0x03]


def test_output_queue_is_bounded():
    dev, bus, *_ = make()
    for _ in range(100):
        bus.write(0x60, b"\xf2")
    assert len(dev.state().output) == k.OUTPUT_QUEUE_LIMIT


def test_state_round_trip():
    dev, bus, *_ = make()
    cmd(bus, 0x60, 0x03)
    cmd(bus, 0xD4, 0xE8)
    bus.write(0x60, b"\xf2")
    cmd(bus, 0xD1)
    st = dev.state()
    kbd2 = RecordingIrqLine()
    other = k.I8042(lambda: None, kbd2)
    other.restore(st)
    assert other.state() == st
    assert kbd2.level is False          # head of queue is the mouse ACK
    assert other.read(0, 1) == b"\xfa"


@pytest.mark.parametrize("bad", [
    dict(command_byte=256), dict(pending_command=0x20), dict(keyboard_pending=0x12),
    dict(scancode_set=4), dict(output=[(0x100, False)]), dict(output=[(1, 0)]),
    dict(output=[(0, False)] * 17), dict(keyboard_scanning=1),
])
def test_restore_rejects_bad_state(bad):
    dev, *_ = make()
    with pytest.raises(StateError):
        dev.restore(k.I8042State(**bad))
