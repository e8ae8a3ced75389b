"""PCI configuration space (through the 0xCF8/0xCFC mechanism of the i440FX-like host) and the
virtio-pci registers in BAR0 (common config, ISR, device config, notify, the MSI-X table and
PBA), on a bus holding a virtio-rng and a virtio-console function. An input is a list of
config-address latches, config-data reads and writes, BAR0 accesses, and now and then the whole
probe sequence (so later accesses meet a live device with ready queues). Oracle: only KvmpyError
escapes, reads return `size` bytes, nothing is written outside guest RAM, and every function's
state() restores into a fresh bus unchanged.
"""
from __future__ import annotations

import common

with common.instrumented("kvmpy.devices.pci", "kvmpy.devices.virtio.transport"):
    from kvmpy.devices.irq import RecordingIrqLine
    from kvmpy.devices.pci import PciRoot
    from kvmpy.devices.virtio.console import VirtioConsole
    from kvmpy.devices.virtio.rng import VirtioRng
    from kvmpy.devices.virtio.transport import VirtioPciDevice
    from kvmpy.errors import KvmpyError

import atheris
from support.mock_driver import BumpAllocator, MockPciDriver
from support.fakes import MsiSink, Sink

RAM = 0x40000
MEM = common.guarded_memory([(0, RAM)])
# BAR0 offsets worth aiming at: each register window's start, end and a little past it
BAR_SPOTS = [0x0, 0x14, 0x16, 0x18, 0x1C, 0x20, 0x30, 0x34, 0x38, 0x1000, 0x1003, 0x2000, 0x2004, 0x2FFF,
             0x3000, 0x3004, 0x3008, 0x4000, 0x400C, 0x4010, 0x4030, 0x6000, 0x6008, 0x7FFC, 0x8000]


def build() -> tuple[PciRoot, list[VirtioPciDevice]]:
    root = PciRoot()
    devs = [VirtioPciDevice(VirtioRng(), MEM, MsiSink(), RecordingIrqLine()),
            VirtioPciDevice(VirtioConsole(Sink()), MEM, MsiSink(), RecordingIrqLine())]
    for dev in devs:
        root.add(dev)
    return root, devs


_, FRESH = build()      # restore() targets: restore loads every field, so one pair serves all inputs
# The bus every input starts from, built once: an input restore()s it to its state as built
# (building two virtio-pci functions per input was a fifth of an input's time). With
# FUZZ_FRESH=1 every input builds its own instead (the reference this reset is checked against).
ROOT, DEVS = build()
ROOT_BUILT, DEVS_BUILT = ROOT.state(), [dev.state() for dev in DEVS]
READS: list[bytes] = []     # what the last input's reads returned (compared across the two modes)


def fresh_bus() -> tuple[PciRoot, list[VirtioPciDevice]]:
    if common.FRESH:
        return build()
    ROOT.restore(ROOT_BUILT)
    for dev, built in zip(DEVS, DEVS_BUILT):
        dev.restore(built)
        dev.intx.history.clear()
    return ROOT, DEVS


def config_address(fdp: atheris.FuzzedDataProvider) -> int:
    if fdp.ConsumeIntInRange(0, 7) == 0:
        return fdp.ConsumeIntInRange(0, 0xFFFFFFFF)
    slot, func, reg = fdp.ConsumeIntInRange(0, 3), fdp.ConsumeIntInRange(0, 1), fdp.ConsumeIntInRange(0, 255)
    return 1 << 31 | slot << 11 | func << 8 | reg


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    MEM.clear()
    READS.clear()
    root, devs = fresh_bus()
    probed: list[VirtioPciDevice] = []
    try:
        for _ in range(fdp.ConsumeIntInRange(0, 100)):
            if fdp.remaining_bytes() == 0:
                break
            op = fdp.ConsumeIntInRange(0, 15)
            size = (1, 2, 4, 8)[fdp.ConsumeIntInRange(0, 3)]
            if op <= 2:
                root.write(0, config_address(fdp).to_bytes(4, "little"))
            elif op <= 4:
                got = root.read(fdp.ConsumeIntInRange(0, 7), size)
                READS.append(got)
                if len(got) != size:
                    raise AssertionError(f"config read of {size} returned {len(got)} bytes")
            elif op <= 7:
                root.write(fdp.ConsumeIntInRange(0, 7), fdp.ConsumeBytes(size).ljust(size, b"\0"))
            else:
                dev = devs[fdp.ConsumeIntInRange(0, 1)]
                offset = BAR_SPOTS[fdp.ConsumeIntInRange(0, len(BAR_SPOTS) - 1)] + fdp.ConsumeIntInRange(0, 8)
                if op <= 9:
                    got = dev.bar_read(fdp.ConsumeIntInRange(0, 1), offset, size)
                    READS.append(got)
                    if len(got) != size:
                        raise AssertionError(f"BAR read of {size} returned {len(got)} bytes")
                elif op <= 13:
                    dev.bar_write(fdp.ConsumeIntInRange(0, 1), offset, fdp.ConsumeBytes(size).ljust(size, b"\0"))
                elif op == 14:
                    if dev not in probed:        # the whole probe: ~30 register writes, once is plenty
                        probed.append(dev)
                        MockPciDriver(dev, MEM, BumpAllocator(0x10000 + 0x10000 * len(probed), RAM)).start(
                            dev.device.num_queues, msix=fdp.ConsumeBool())
                else:
                    dev.handle_notify(fdp.ConsumeIntInRange(0, 2))
        for dev, other in zip(devs, FRESH):
            saved = dev.state()
            other.restore(saved)
            if other.state() != saved:
                raise AssertionError(f"{dev.name}: state() after restore() differs")
    except KvmpyError:
        pass
    except RuntimeError as e:               # the mock driver's "device rejected features"
        if "rejected" not in str(e):
            raise
    finally:
        MEM.check_guards()


def seeds() -> common.Seeds:
    yield bytes(32)
    yield bytes([14, 0, 0, 0]) * 8


if __name__ == "__main__":
    common.main(test_one_input, seeds)
