"""The split-virtqueue walk, differential: the Python walker (Virtqueue._walk, the reference)
and the C one (vqfast.c through fastpath.CRing) pop and push the same guest-written rings, each
in its own guarded guest RAM. They must agree on every chain and every error, leave the same
bytes in RAM, dirty maps and indices, and write nothing but the used ring.

Guest RAM: 64 KiB at GPA 0 and 16 KiB at 4 GiB (a second range, as a >3 GiB guest has). The
input is read structurally (FuzzedDataProvider): queue size and features, where the rings are,
each descriptor (addresses drawn mostly near something interesting: the indirect pool, the
end of a range, the second range), the avail ring, the starting indices, and raw bytes for the
indirect-table pool at 0x3000.
"""
from __future__ import annotations

import struct

import common

with common.instrumented("kvmpy.devices.virtio.queue", "kvmpy.devices.virtio.fastpath"):
    from kvmpy.devices.virtio import fastpath
    from kvmpy.devices.virtio.queue import QueueError, Virtqueue
    from kvmpy.errors import KvmpyError

import atheris

RAM0, RAM1_GPA, RAM1 = 0x10000, 1 << 32, 0x4000
DESC, AVAIL, USED, POOL, DATA = 0x0, 0x1000, 0x2000, 0x3000, 0x4000
IMAGE_BYTES = 0x4000           # what the input writes: rings and the indirect pool
MAX_SIZE = 256
_DESC = struct.Struct("<QIHH")

if not fastpath.AVAILABLE:
    raise SystemExit("fuzz/virtqueue.py: kvmpy.ioctl._kvm lacks the C walker; rebuild it (make venv)")


def make_world() -> tuple[object, Virtqueue, Virtqueue]:
    mem = common.guarded_memory([(0, RAM0), (RAM1_GPA, RAM1)])
    return mem, Virtqueue(mem, 0, MAX_SIZE, fast=False), Virtqueue(mem, 0, MAX_SIZE, fast=True)


PY_MEM, PY_Q, _ = make_world()
C_MEM, _, C_Q = make_world()


def pick_addr(fdp: atheris.FuzzedDataProvider) -> int:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind <= 1:
        return POOL + 16 * fdp.ConsumeIntInRange(0, 255)
    if kind <= 3:
        return DATA + fdp.ConsumeIntInRange(0, RAM0 - DATA)
    if kind == 4:
        return RAM0 - fdp.ConsumeIntInRange(0, 64)
    if kind == 5:
        return RAM1_GPA + fdp.ConsumeIntInRange(0, RAM1 + 64) - 32
    if kind == 6:
        return fdp.ConsumeIntInRange(0, POOL)
    return fdp.ConsumeIntInRange(0, (1 << 64) - 1)


def pick_len(fdp: atheris.FuzzedDataProvider) -> int:
    kind = fdp.ConsumeIntInRange(0, 5)
    if kind <= 2:
        return fdp.ConsumeIntInRange(0, 64)
    if kind == 3:
        return 16 * fdp.ConsumeIntInRange(0, 2 * MAX_SIZE)
    if kind == 4:
        return fdp.ConsumeIntInRange(0, RAM0)
    return fdp.ConsumeIntInRange(0, (1 << 32) - 1)


def ring_addr(fdp: atheris.FuzzedDataProvider, usual: int) -> int:
    """Usually where the rings belong; sometimes anywhere (activate must refuse or cope)."""
    if fdp.ConsumeIntInRange(0, 15):
        return usual
    return pick_addr(fdp) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, RAM0)


def build(data: bytes) -> tuple[dict, bytes]:
    fdp = atheris.FuzzedDataProvider(data)
    size = 1 << fdp.ConsumeIntInRange(0, 8)
    regs = dict(size=size if fdp.ConsumeIntInRange(0, 31) else fdp.ConsumeIntInRange(0, 0xFFFF),
                event_idx=fdp.ConsumeBool(), indirect=fdp.ConsumeBool(), tracking=fdp.ConsumeBool(),
                desc=ring_addr(fdp, DESC), avail=ring_addr(fdp, AVAIL), used=ring_addr(fdp, USED),
                last_avail=fdp.ConsumeIntInRange(0, 0xFFFF), used_idx=fdp.ConsumeIntInRange(0, 0xFFFF))
    image = bytearray(IMAGE_BYTES)
    for i in range(min(size, fdp.ConsumeIntInRange(1, size))):
        flags = fdp.ConsumeIntInRange(0, 7) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
        nxt = fdp.ConsumeIntInRange(0, size) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
        _DESC.pack_into(image, DESC + 16 * i, pick_addr(fdp), pick_len(fdp), flags, nxt)
    pending = fdp.ConsumeIntInRange(0, size + 1) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
    struct.pack_into("<HH", image, AVAIL, fdp.ConsumeIntInRange(0, 3), (regs["last_avail"] + pending) & 0xFFFF)
    for i in range(min(size, pending)):
        slot = (regs["last_avail"] + i) & (size - 1)
        head = fdp.ConsumeIntInRange(0, size - 1) if fdp.ConsumeIntInRange(0, 7) else fdp.ConsumeIntInRange(0, 0xFFFF)
        struct.pack_into("<H", image, AVAIL + 4 + 2 * slot, head)
    struct.pack_into("<H", image, AVAIL + 4 + 2 * size, fdp.ConsumeIntInRange(0, 0xFFFF))   # used_event
    pool = fdp.ConsumeBytes(IMAGE_BYTES - POOL)
    image[POOL:POOL + len(pool)] = pool
    return regs, bytes(image)


def play(mem, q: Virtqueue, regs: dict, image: bytes) -> list:
    """Reset the world, lay out the input and pop/push until the ring is empty or broken."""
    mem.clear()
    mem.write(0, image)
    mem.tracking = regs["tracking"]
    q.reset()
    q.size, q.desc_addr, q.avail_addr, q.used_addr = regs["size"], regs["desc"], regs["avail"], regs["used"]
    try:
        q.activate(regs["event_idx"], regs["indirect"])
    except QueueError as e:
        return [("refused", e.detail)]
    q.last_avail_idx, q.used_idx = regs["last_avail"], regs["used_idx"]
    events: list = []
    for _ in range(q.size + 2):
        try:
            chain = q.pop()
        except QueueError as e:
            events.append(("error", e.detail))
            break
        if chain is None:
            events.append(("empty",))
            break
        events.append((chain.head, chain.readable, chain.writable, chain.readable_len, chain.writable_len))
        q.push(chain, chain.writable_len // 2 + 1)
    events.append(("notify", q.should_notify(), q.last_avail_idx, q.used_idx))
    return events


def check_writes(mem, regs: dict, image: bytes) -> None:
    """The walk writes only the used ring (elements, index, avail_event)."""
    lo = regs["used"]
    hi = lo + 6 + 8 * regs["size"]
    for gpa, n, expect in ((0, RAM0, image + bytes(RAM0 - len(image))), (RAM1_GPA, RAM1, bytes(RAM1))):
        now = mem.read(gpa, n)
        a, b = min(max(lo - gpa, 0), n), min(max(hi - gpa, 0), n)     # the used ring's part here
        if now[:a] != expect[:a] or now[b:] != expect[b:]:
            first = next(i for i in range(n) if now[i] != expect[i] and not a <= i < b)
            raise common.GuardViolation(f"the walk wrote RAM at {gpa + first:#x}, outside the used ring "
                                        f"[{lo:#x}, {hi:#x})")


def check_dirty(mem, image: bytes, path: str) -> None:
    """While tracking, every page the walk changed is marked in the userspace dirty map (live
    migration would otherwise miss it). Marking more is allowed: it only resends a page."""
    for (gpa, n, expect), dirty in zip(((0, RAM0, image + bytes(RAM0 - len(image))), (RAM1_GPA, RAM1, bytes(RAM1))),
                                       mem.dirty_maps):
        now = mem.read(gpa, n)
        for page in range(n // 4096):
            lo = page * 4096
            if now[lo:lo + 4096] != expect[lo:lo + 4096] and not dirty[page]:
                raise AssertionError(f"the {path} path changed the page at {gpa + lo:#x} without marking it dirty")


def test_one_input(data: bytes) -> None:
    regs, image = build(data)
    try:
        py = play(PY_MEM, PY_Q, regs, image)
        c = play(C_MEM, C_Q, regs, image)
    except KvmpyError:
        return            # the documented refusal (none is expected here: errors are events)
    finally:
        PY_MEM.check_guards()
        C_MEM.check_guards()
    if py != c:
        raise AssertionError(f"Python and C walkers differ:\n  python {py}\n  c      {c}")
    for gpa, n in ((0, RAM0), (RAM1_GPA, RAM1)):
        if PY_MEM.read(gpa, n) != C_MEM.read(gpa, n):
            raise AssertionError(f"Python and C walkers left different RAM in the range at {gpa:#x}")
    check_writes(PY_MEM, regs, image)
    if regs["tracking"]:
        check_dirty(PY_MEM, image, "Python")
        check_dirty(C_MEM, image, "C")


def seeds() -> common.Seeds:
    yield bytes(64)
    yield bytes([3, 0, 0, 0]) + bytes(range(256)) * 2
    yield b"\x08\x01\x01" + bytes(200)


if __name__ == "__main__":
    common.main(test_one_input, seeds)
