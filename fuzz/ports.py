"""The legacy port devices a guest pokes directly: COM1 (16550), the i8042, the CMOS RTC, the
ACPI PM block, fw_cfg (with DMA into guarded guest RAM), debug-exit, ports 0x61/0x80/0x92 and a
probe sink. An input is a device and a list of port reads and writes (any offset a little past
the device's window, sizes 1/2/4/8) mixed with host-side events (serial and keyboard input, RTC
polls, the clock moving). Oracle: only KvmpyError escapes, a read returns exactly `size`
bytes, fw_cfg DMA stays inside guest RAM, and the device's state() survives a restore() into a
fresh device unchanged.
"""
from __future__ import annotations

import struct

import common

with common.instrumented("kvmpy.devices"):
    from kvmpy.devices import acpi_pm, debug_exit, fw_cfg, i8042, legacy, rtc, serial
    from kvmpy.devices.irq import RecordingIrqLine
    from kvmpy.errors import KvmpyError

import atheris
from support.fakes import Clock

RAM = 0x10000
DMA_AT = 0x1000                 # where a DMA host event puts the access structure
MEM = common.guarded_memory([(0, RAM)])
FW_CFG_ITEMS = fw_cfg.build_items(RAM, 2, [("opt/fuzz", b"fuzz" * 40), ("opt/empty", b"")])


def _noop(*_: object) -> None:
    pass


FACTORIES = {
    "serial": lambda c: serial.Serial16550(RecordingIrqLine(), _noop, backlog_limit=64),
    "i8042": lambda c: i8042.I8042(_noop, RecordingIrqLine(), RecordingIrqLine()),
    "rtc": lambda c: rtc.CmosRtc(RecordingIrqLine(), c),
    "acpi-pm": lambda c: acpi_pm.AcpiPm(_noop, _noop, clock_ns=c.ns),
    "fw_cfg": lambda c: fw_cfg.FwCfg(MEM, FW_CFG_ITEMS),
    "debug-exit": lambda c: debug_exit.DebugExit(_noop),
    "port80": lambda c: legacy.PostCodePort(),
    "port92": lambda c: legacy.FastA20Port(_noop),
    "port61": lambda c: legacy.SystemControlPortB(),
    "probe": lambda c: legacy.ProbeSink("COM2"),
}
NAMES = sorted(FACTORIES)


def host_event(name: str, dev: object, clock: Clock, data: bytes) -> None:
    """What the host side does to a device between guest accesses."""
    clock.t += data[0] / 16 if data else 0.5
    if name == "serial":
        dev.enqueue_input(data * 8)
    elif name == "i8042":
        dev.push_keyboard_data(data)
    elif name == "rtc":
        dev.poll()
    elif name == "fw_cfg":          # a guest's DMA request: the access structure, then the doorbell
        control, length, target = (int.from_bytes(data[i:i + 4], "little") for i in (0, 4, 8))
        MEM.write(DMA_AT, struct.pack(">IIQ", control, length % (2 * RAM), target % (RAM + 64)))
        dev.write(fw_cfg.DMA_OFFSET, b"\0\0\0\0")
        dev.write(fw_cfg.DMA_OFFSET + 4, DMA_AT.to_bytes(4, "big"))


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    name = NAMES[fdp.ConsumeIntInRange(0, len(NAMES) - 1)]
    clock = Clock()
    MEM.clear()
    try:
        dev = FACTORIES[name](clock)
        for _ in range(fdp.ConsumeIntInRange(0, 256)):
            if fdp.remaining_bytes() == 0:
                break
            kind = fdp.ConsumeIntInRange(0, 7)
            offset = fdp.ConsumeIntInRange(0, 19)
            size = (1, 2, 4, 8)[fdp.ConsumeIntInRange(0, 3)]
            if kind <= 2:
                got = dev.read(offset, size)
                if len(got) != size:
                    raise AssertionError(f"{name}: read({offset}, {size}) returned {len(got)} bytes")
            elif kind <= 6:
                dev.write(offset, fdp.ConsumeBytes(size).ljust(size, b"\0"))
            else:
                host_event(name, dev, clock, fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 24)))
        saved = dev.state()
        fresh = FACTORIES[name](clock)
        fresh.restore(saved)
        if fresh.state() != saved:
            raise AssertionError(f"{name}: state() after restore() differs from the state restored")
    except KvmpyError:
        pass
    finally:
        MEM.check_guards()


def seeds() -> common.Seeds:
    for i in range(len(NAMES)):
        yield bytes([i]) + bytes(range(64))


if __name__ == "__main__":
    common.main(test_one_input, seeds)
