"""virtio-rng and virtio-console queues: a driver (tests/support/mock_driver.py) probes the
device with or without MSI-X, then the input queues chains of buffers (addresses near the ends
of RAM, over the rings, past RAM; readable and writable in any order, sometimes as an indirect
table), pokes raw descriptors and ring indices, kicks queues, reads the ISR, and (console) feeds
host input. Oracle: only KvmpyError escapes, nothing lands outside guest RAM, and as long as the
input made no raw pokes the device writes nothing but the writable buffers it was given and the
used rings.
"""
from __future__ import annotations

import common

with common.instrumented("kvmpy.devices.virtio"):
    from kvmpy.devices.irq import RecordingIrqLine
    from kvmpy.devices.virtio.console import VirtioConsole
    from kvmpy.devices.virtio.rng import VirtioRng
    from kvmpy.devices.virtio.transport import VirtioPciDevice
    from kvmpy.errors import KvmpyError

import atheris
import numpy as np
from support.mock_driver import BumpAllocator, MockPciDriver, MockQueue
from support.fakes import MsiSink, Sink

RAM = 0x10000
RINGS = 0x1000                  # the driver's rings go in [RINGS, TABLES)
TABLES = 0x5000                 # indirect tables, 64 bytes each, up to BUFFERS
BUFFERS = 0x6000
MEM = common.guarded_memory([(0, RAM)])


def pick_addr(fdp: atheris.FuzzedDataProvider) -> int:
    kind = fdp.ConsumeIntInRange(0, 9)
    if kind <= 5:
        return BUFFERS + fdp.ConsumeIntInRange(0, RAM - BUFFERS)
    if kind == 6:
        return RAM - fdp.ConsumeIntInRange(0, 64)
    if kind == 7:
        return RINGS + fdp.ConsumeIntInRange(0, BUFFERS - RINGS)        # over the rings and tables
    return fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def pick_len(fdp: atheris.FuzzedDataProvider) -> int:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind <= 5:
        return fdp.ConsumeIntInRange(0, 64)
    if kind == 6:
        return fdp.ConsumeIntInRange(0, RAM)
    return fdp.ConsumeIntInRange(0, (1 << 32) - 1)


RAM_NOW = np.frombuffer(MEM.buffer(0, RAM), np.uint8)     # guest RAM as it is, no copy


def changed_outside(before: np.ndarray, after: np.ndarray, allowed: list[tuple[int, int]]) -> int | None:
    diff = np.flatnonzero(before != after)
    for pos in diff.tolist():
        if not any(a <= pos < a + n for a, n in allowed):
            return pos
    return None


class World:
    """One probed device (DRIVER_OK, queues ready), set up once; reset() puts it back there for
    the next input by restore() of the state saved after the probe, over cleared RAM, with fresh
    driver-side queues on the same rings. Probing per input cost ~3x the rest of an input."""

    def __init__(self, backend: object, msix: bool):
        self.backend = backend
        MEM.clear()
        self.irq = RecordingIrqLine()
        self.dev = VirtioPciDevice(backend, MEM, MsiSink(), self.irq)
        queues = MockPciDriver(self.dev, MEM, BumpAllocator(RINGS, BUFFERS)).start(backend.num_queues, msix=msix)
        self.rings = [(q.desc_addr, q.size) for q in queues]
        self.saved = self.dev.state()

    def reset(self) -> list[MockQueue]:
        MEM.clear()
        queues = [MockQueue(MEM, base, size) for base, size in self.rings]
        self.dev.restore(self.saved)
        self.irq.history.clear()        # (it would grow by every input's interrupts)
        return queues


WORLDS = [World(backend, msix) for msix in (False, True)
          for backend in (VirtioConsole(Sink()), VirtioRng(), VirtioRng(max_bytes_per_request=37))]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    world = WORLDS[fdp.ConsumeIntInRange(0, len(WORLDS) - 1)]
    backend, dev = world.backend, world.dev
    console = isinstance(backend, VirtioConsole)
    poked, tables = False, 0
    try:
        queues = world.reset()
        allowed = [(q.used_addr, 6 + 8 * q.size) for q in queues]
        for _ in range(fdp.ConsumeIntInRange(0, 64)):
            if fdp.remaining_bytes() == 0:
                break
            op = fdp.ConsumeIntInRange(0, 15)
            q = queues[fdp.ConsumeIntInRange(0, len(queues) - 1)]
            if op <= 6:
                segs = [(pick_addr(fdp), pick_len(fdp), fdp.ConsumeBool()) for _ in range(fdp.ConsumeIntInRange(1, 4))]
                if len(segs) > len(q.free):
                    continue
                indirect = None
                if fdp.ConsumeIntInRange(0, 3) == 0 and tables < 16:
                    indirect, tables = TABLES + 64 * tables, tables + 1     # one table per chain
                q.add(segs, indirect_at=indirect)
                writable = [(a, n) for a, n, w in segs if w]
                allowed += writable
                # a writable buffer over the rings or a table lets the device's data rewrite
                # descriptors: what it writes next is then anyone's guess
                poked = poked or any(a < BUFFERS and a + n > RINGS for a, n in writable)
            elif op <= 10 or (op == 11 and console):
                before = np.array(RAM_NOW)           # one copy; compared with RAM in place
                if op == 11:
                    backend.enqueue_input(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 300)))
                else:
                    dev.handle_notify(fdp.ConsumeIntInRange(0, 2))
                if not poked and (pos := changed_outside(before, RAM_NOW, allowed)) is not None:
                    raise common.GuardViolation(f"the device wrote guest RAM at {pos:#x}, outside every "
                                                f"writable buffer it was given and the used rings")
                q.used()
            elif op == 12:
                dev.bar_read(0, 0x1000, 1)                        # ISR: read-to-clear
            elif op == 13:
                poked = True
                q.write_desc(fdp.ConsumeIntInRange(0, q.size), pick_addr(fdp), pick_len(fdp),
                             fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, q.size + 1))
            elif op == 14:
                poked = True
                q.set_avail_idx(q.avail_idx + fdp.ConsumeIntInRange(0, 0xFFFF))
            else:
                q.set_used_event(fdp.ConsumeIntInRange(0, 0xFFFF))
    except KvmpyError:
        pass
    except MemoryError as e:                       # the mock driver's own limit, not the device's
        if "queue full" not in str(e):
            raise
    finally:
        MEM.check_guards()


def seeds() -> common.Seeds:
    yield bytes(40)
    yield b"\x01" + bytes(range(100))


if __name__ == "__main__":
    common.main(test_one_input, seeds)
