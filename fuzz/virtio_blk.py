"""virtio-blk requests, differential: the Python request path and the C one (vqfast.c's
kvmpy_blk_run) each serve the same requests on their own disk image and guarded guest RAM,
through the real transport. Requests are built from the input: type (read, write, flush,
GET_ID, discard, write-zeroes, unknown), sector (in range, at the end, past it, huge),
header/data/status layouts, buffer addresses near RAM's end or over the rings, indirect tables;
plus raw descriptor pokes and avail-index jumps. Oracle: only KvmpyError escapes, nothing is
written outside guest RAM, the two paths leave the same used entries, RAM, image bytes and
broken flag, and (without raw pokes) the device writes only the writable buffers it was given
and the used ring.
"""
from __future__ import annotations

import os
import random

import common

with common.instrumented("kvmpy.devices.virtio.blk", "kvmpy.devices.virtio.queue", "kvmpy.devices.virtio.fastpath",
                           "kvmpy.devices.virtio.transport"):
    from kvmpy.devices.irq import RecordingIrqLine
    from kvmpy.devices.virtio import fastpath
    from kvmpy.devices.virtio.blk import T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, VirtioBlk
    from kvmpy.devices.virtio.drive import DriveSpec
    from kvmpy.devices.virtio.transport import VirtioPciDevice
    from kvmpy.errors import KvmpyError

import atheris
import numpy as np
from support.mock_driver import BumpAllocator, MockPciDriver, MockQueue

RAM = 0x20000
RINGS, HDRS, DATA = 0x1000, 0x6000, 0x8000
SECTORS = 64
IMAGE = random.Random(5).randbytes(SECTORS * 512)
WORKDIR = common.scratch_dir("blk")
TYPES = [T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, 7]

if not fastpath.AVAILABLE:
    raise SystemExit("fuzz/virtio_blk.py: kvmpy.ioctl._kvm lacks the C data path; rebuild it (make venv)")


class World:
    """One data path's disk, RAM and device, set up once and reset to the same point per input."""

    def __init__(self, name: str, fast: bool):
        self.mem = common.guarded_memory([(0, RAM)])
        path = os.path.join(WORKDIR, f"{name}.img")
        with open(path, "wb") as f:
            f.write(IMAGE)
        self.blk = VirtioBlk(DriveSpec(path, serial="fuzz"), fast=fast)
        self.fd = self.blk.fd
        self.irq = RecordingIrqLine()
        self.dev = VirtioPciDevice(self.blk, self.mem, None, self.irq)
        for q in self.dev.queues:
            q.fast = fast
        (q,) = MockPciDriver(self.dev, self.mem, BumpAllocator(RINGS, HDRS)).start(1)
        self.queue_at, self.queue_size = q.desc_addr, q.size
        self.saved = self.dev.state()

    def reset(self) -> MockQueue:
        self.mem.clear()
        os.pwrite(self.fd, IMAGE, 0)
        q = MockQueue(self.mem, self.queue_at, self.queue_size)
        self.dev.restore(self.saved)
        self.irq.history.clear()        # (it would grow by every input's interrupts)
        return q

    def image(self) -> bytes:
        return os.pread(self.fd, len(IMAGE) + 512, 0)


PY, C = World("python", False), World("c", True)


def pick_addr(fdp: atheris.FuzzedDataProvider) -> int:
    """Mostly the data area (a request with one wild buffer just breaks the device: kept rare)."""
    kind = fdp.ConsumeIntInRange(0, 19)
    if kind <= 11:
        return DATA + fdp.ConsumeIntInRange(0, RAM - DATA)
    if kind <= 15:
        return DATA + 512 * fdp.ConsumeIntInRange(0, (RAM - DATA) // 512)
    if kind == 16:
        return RAM - fdp.ConsumeIntInRange(0, 4096)
    if kind <= 18:
        return RINGS + fdp.ConsumeIntInRange(0, HDRS - RINGS)
    return fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def pick_len(fdp: atheris.FuzzedDataProvider) -> int:
    kind = fdp.ConsumeIntInRange(0, 15)
    if kind <= 7:
        return 512 * fdp.ConsumeIntInRange(0, 16)
    if kind <= 12:
        return fdp.ConsumeIntInRange(0, 4096)
    if kind <= 14:
        return 4096 * fdp.ConsumeIntInRange(1, 4)
    return fdp.ConsumeIntInRange(0, (1 << 32) - 1)


def pick_sector(fdp: atheris.FuzzedDataProvider) -> int:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind <= 4:
        return fdp.ConsumeIntInRange(0, SECTORS)
    if kind == 5:
        return SECTORS - fdp.ConsumeIntInRange(0, 16)
    return fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def plan(data: bytes) -> list[tuple]:
    """The input as a list of driver actions, played identically on both worlds."""
    fdp = atheris.FuzzedDataProvider(data)
    ops: list[tuple] = []
    for _ in range(fdp.ConsumeIntInRange(0, 24)):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 15)
        if op <= 8:
            rtype = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
            hdr = HDRS + 32 * fdp.ConsumeIntInRange(0, 63) if fdp.ConsumeIntInRange(0, 7) else pick_addr(fdp)
            header = (rtype, fdp.ConsumeIntInRange(0, 0xFFFFFFFF) if fdp.ConsumeIntInRange(0, 15) == 0 else 0,
                      pick_sector(fdp))
            segs = [(hdr, 16 if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 64), False)]
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                segs.append((pick_addr(fdp), pick_len(fdp), rtype == T_IN if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeBool()))
            if fdp.ConsumeIntInRange(0, 7):
                segs.append((HDRS + 0x800 + 16 * fdp.ConsumeIntInRange(0, 63), 1, True))
            payload = fdp.ConsumeBytes(16 * fdp.ConsumeIntInRange(0, 3)) if rtype in (T_DISCARD, T_WRITE_ZEROES) else b""
            indirect = fdp.ConsumeIntInRange(0, 3) == 0      # placed by play(): one table per chain
            ops.append(("req", header, segs, payload, indirect))
        elif op <= 12:
            ops.append(("notify",))
        elif op == 13:
            ops.append(("desc", fdp.ConsumeIntInRange(0, 15), pick_addr(fdp), pick_len(fdp),
                        fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, 20)))
        elif op == 14:
            ops.append(("jump", fdp.ConsumeIntInRange(0, 3) if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeIntInRange(0, 0xFFFF)))
        else:
            ops.append(("used_event", fdp.ConsumeIntInRange(0, 0xFFFF)))
    return ops


def play(world: World, ops: list[tuple]) -> list:
    q = world.reset()
    mem, events, allowed, poked, tables = world.mem, [], [(q.used_addr, 6 + 8 * q.size)], False, 0
    ram = np.frombuffer(mem.buffer(0, RAM), np.uint8)
    for op in ops:
        if op[0] == "req":
            _, (rtype, reserved, sector), segs, payload, indirect = op
            if len(segs) > len(q.free) or (indirect and len(segs) > 4):
                continue
            hdr_addr, hdr_len, _ = segs[0]
            if mem.contains(hdr_addr, 16):
                mem.write(hdr_addr, rtype.to_bytes(4, "little") + reserved.to_bytes(4, "little")
                          + sector.to_bytes(8, "little"))
            if payload and len(segs) > 1 and not segs[1][2] and mem.contains(segs[1][0], len(payload)):
                mem.write(segs[1][0], payload)
            if indirect:
                indirect, tables = HDRS + 0xC00 + 64 * tables, tables + 1    # one table per chain
                if tables > 16:
                    continue
            q.add(segs, indirect_at=indirect or None)
            writable = [(a, n) for a, n, w in segs if w]
            allowed += writable
            # a writable buffer over the rings or a table lets the device's data rewrite
            # descriptors: what it writes next is then anyone's guess
            poked = poked or any(a < HDRS + 0x1000 and a + n > RINGS for a, n in writable)
        elif op[0] == "notify":
            before = np.array(ram)                  # one copy; compared with RAM in place
            world.dev.handle_notify(0)
            if not poked:
                diff = np.flatnonzero(before != ram)
                for pos in diff.tolist():
                    if not any(a <= pos < a + n for a, n in allowed):
                        raise common.GuardViolation(f"virtio-blk wrote guest RAM at {pos:#x}, outside the "
                                                    f"writable buffers it was given and the used ring")
            events.append(("used", q.used(), world.dev.broken))
        elif op[0] == "desc":
            poked = True
            q.write_desc(op[1] % q.size, op[2], op[3], op[4], op[5])
        elif op[0] == "jump":
            poked = True
            q.set_avail_idx(q.avail_idx + op[1])
        else:
            q.set_used_event(op[1])
    return events


def test_one_input(data: bytes) -> None:
    ops = plan(data)
    try:
        py = play(PY, ops)
        c = play(C, ops)
    except KvmpyError:
        return
    finally:
        PY.mem.check_guards()
        C.mem.check_guards()
    if py != c:
        raise AssertionError(f"the Python and C paths differ:\n  python {py}\n  c      {c}")
    if PY.mem.read(0, RAM) != C.mem.read(0, RAM):
        raise AssertionError("the Python and C paths left different guest RAM")
    if PY.image() != C.image():
        raise AssertionError("the Python and C paths left different disk images")


def seeds() -> common.Seeds:
    yield bytes(64)
    yield bytes(range(256))


if __name__ == "__main__":
    common.main(test_one_input, seeds)
