"""virtio-net, differential: the C data path (kvmpy/ioctl/netfast.c: TAP reads, the receive
filter, buffer placement, tx header checks) against the Python reference (netpath), each on its
own guarded guest RAM and socketpair "TAP", driven by the same actions. The actions and the
comparison are the tier-0 property test's (tests/tier0/test_virtio_net_differential.py): rx
buffers (sane, odd, over the rings, past RAM), host frames of any length and destination, guest
tx chains with any header, control-queue commands, link changes, raw descriptor pokes and avail
jumps. Here the input picks them and coverage guides the picking. Oracle: only KvmpyError
escapes, nothing lands outside guest RAM, and both paths leave the same used entries, RAM,
host-side frames, counters, breakage and warnings.
"""
from __future__ import annotations

import sys
import types

import common

sys.path.insert(0, str(common.REPO_ROOT / "tests" / "tier0"))
with common.instrumented("kvmpy.devices.virtio.net", "kvmpy.devices.virtio.netpath", "kvmpy.devices.virtio.netctrl",
                         "kvmpy.devices.virtio.queue", "kvmpy.devices.virtio.fastpath"):
    import test_virtio_net_differential as tv   # tests/tier0: the worlds, actions and comparison
    from kvmpy.devices.virtio import netctrl
    from kvmpy.devices.virtio.net import log as net_log
    from kvmpy.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX
    from kvmpy.errors import KvmpyError

import atheris
import numpy as np
from kvmpy.ratelimit import RateLimitedLog

if not tv.netpath.AVAILABLE:
    raise SystemExit("fuzz/virtio_net.py: kvmpy.ioctl._kvm lacks the C net path; rebuild it (make venv)")

FRESH = common.FRESH
_FRESH_MEMS: list = []


def _memory(size: int):
    """Guarded RAM for a world: its own for a cached world; with FUZZ_FRESH, one of two
    reused in turn (python, c), since a GuardedMemory lives as long as the process."""
    if not FRESH:
        return common.guarded_memory([(0, size)])
    if len(_FRESH_MEMS) < 2:
        _FRESH_MEMS.append(common.guarded_memory([(0, size)]))
    _FRESH_MEMS.append(_FRESH_MEMS.pop(0))
    _FRESH_MEMS[-1].clear()
    return _FRESH_MEMS[-1]


tv.GuestMemory = types.SimpleNamespace(create=_memory)


class CachedWorld:
    """One probed world (a data path and a feature mask), built once and put back per input where
    the probe left it: RAM cleared, both socket ends drained, the device restore()d to the state
    saved after the probe, counters, rate limits and records fresh, new driver-side queues on the
    same rings. Building and probing two worlds per input (~80 register writes) was a third of an
    input's time; FUZZ_FRESH=1 builds per input instead, to check this reset against."""

    def __init__(self, fast: bool, mask: int):
        self.world = w = tv.build(fast, mask)
        self.rings = [(q.desc_addr, q.size) for q in w.qs]
        self.saved = w.dev.state()
        self.probed_seen = list(w.seen)     # what the probe recorded (the watch calls): as after a build

    def reset(self) -> tv.World:
        w = self.world
        w.mem.clear()
        w.tap.drain()
        while True:                         # frames the last input sent that the device never read
            try:
                w.tap.dev_end.recv(1 << 17)
            except BlockingIOError:
                break
        w.dev.restore(self.saved)
        w.net.stats = netctrl.NetStats()
        w.net._ratelog = RateLimitedLog(net_log)
        w.qs = [tv.MockQueue(w.mem, base, size) for base, size in self.rings]
        w.seen[:] = self.probed_seen
        w.logs.clear()
        return w


_WORLDS: dict[tuple[bool, int], CachedWorld] = {}


def world(fast: bool, mask: int) -> tv.World:
    """A fresh build per input when FUZZ_FRESH=1 (the reference the cached reset is checked
    against); else the cached world, reset."""
    if FRESH:
        return tv.build(fast, mask)
    cached = _WORLDS.get((fast, mask))
    if cached is None:
        cached = _WORLDS[(fast, mask)] = CachedWorld(fast, mask)
    return cached.reset()


_PERIODS: dict[int, bytes] = {}


def frame_bytes(dest: int, length: int, seed: int, hdr: bytes = bytes(tv.HDR_LEN)) -> bytes:
    """tv.frame_bytes, the same bytes without a generator per byte (half of an input's time):
    the body (seed + 7*i) & 0xFF repeats every 256 bytes."""
    period = _PERIODS.get(seed & 0xFF)
    if period is None:
        period = _PERIODS[seed & 0xFF] = bytes((seed + 7 * i) & 0xFF for i in range(256))
    n = max(0, length - tv.HDR_LEN - 12)
    body = (period * (n // 256 + 1))[:n]
    return (hdr + tv.DESTS[dest % len(tv.DESTS)] + tv.MAC + body)[:max(length, 0)]


assert all(frame_bytes(d, n, s) == tv.frame_bytes(d, n, s) for d, n, s in ((0, 3000, 5), (4, 40, 300), (1, 0, 7)))
tv.frame_bytes = frame_bytes
MASKS = [0, netctrl.F_MRG_RXBUF, VIRTIO_F_RING_EVENT_IDX, netctrl.F_MRG_RXBUF | VIRTIO_F_RING_EVENT_IDX,
         netctrl.F_CSUM | netctrl.F_HOST_ECN]
CTRL = ["nopromisc", "allmulti", "nouni", "nobcast", "table", "overflow", "promisc"]
FRAME_LENS = [tv.HDR_LEN + 13, tv.HDR_LEN + 14, 9014, 30000, 65549]


def frame_len(fdp: atheris.FuzzedDataProvider) -> int:
    return fdp.ConsumeIntInRange(0, 1600) if fdp.ConsumeIntInRange(0, 3) else FRAME_LENS[fdp.ConsumeIntInRange(0, 4)]


def rx_seg(fdp: atheris.FuzzedDataProvider) -> tuple[int, int, bool]:
    kind = fdp.ConsumeIntInRange(0, 7)
    if kind <= 4:
        return tv.RXBUF + 0x700 * fdp.ConsumeIntInRange(0, 255), (1500, 1526, 2048, 4096, 8, 12, 13)[fdp.ConsumeIntInRange(0, 6)], True
    if kind <= 6:
        return fdp.ConsumeIntInRange(tv.RXBUF, tv.RAM), fdp.ConsumeIntInRange(0, 0x3000), fdp.ConsumeBool()
    return (tv.RINGS, tv.RAM - 100, tv.RAM, 2**64 - 64)[fdp.ConsumeIntInRange(0, 3)], fdp.ConsumeIntInRange(0, 200), True


def plan(data: bytes) -> tuple[int, list[tuple]]:
    fdp = atheris.FuzzedDataProvider(data)
    mask = MASKS[fdp.ConsumeIntInRange(0, len(MASKS) - 1)]
    ops: list[tuple] = []
    for _ in range(fdp.ConsumeIntInRange(1, 24)):
        if fdp.remaining_bytes() == 0:
            break
        op = fdp.ConsumeIntInRange(0, 14)
        if op == 0:
            ops.append(("rx", [rx_seg(fdp) for _ in range(fdp.ConsumeIntInRange(1, 3))]))
        elif op == 1:
            ops.append(("rxmany", fdp.ConsumeIntInRange(1, 40), (1526, 2048, 4096)[fdp.ConsumeIntInRange(0, 2)]))
        elif op <= 3:
            ops.append(("send", fdp.ConsumeIntInRange(0, 5), frame_len(fdp), fdp.ConsumeIntInRange(0, 255)))
        elif op == 4:
            ops.append(("exchange", [(fdp.ConsumeIntInRange(0, 5), frame_len(fdp)) for _ in range(fdp.ConsumeIntInRange(1, 4))],
                        (1526, 2048, 4096)[fdp.ConsumeIntInRange(0, 2)]))
        elif op <= 6:
            hdr = bytes([fdp.ConsumeIntInRange(0, 3), (0, 1, 3, 4, 5, 0x81, 0x80)[fdp.ConsumeIntInRange(0, 6)]]) \
                + fdp.ConsumeBytes(10).ljust(10, b"\0") if fdp.ConsumeIntInRange(0, 3) == 0 else bytes(tv.HDR_LEN)
            ops.append(("tx", fdp.ConsumeIntInRange(0, 5), frame_len(fdp), hdr[:tv.HDR_LEN],
                        [fdp.ConsumeIntInRange(1, 64) for _ in range(fdp.ConsumeIntInRange(0, 3))]))
        elif op <= 8:
            ops.append(("readable",))
        elif op <= 10:
            ops.append(("notify", fdp.ConsumeIntInRange(0, 2)))
        elif op == 11:
            ops.append(("ctrl", CTRL[fdp.ConsumeIntInRange(0, len(CTRL) - 1)]))
        elif op == 12:
            ops.append(("link", fdp.ConsumeBool()))
        elif op == 13:
            ops.append(("desc", fdp.ConsumeIntInRange(0, 1), fdp.ConsumeIntInRange(0, tv.QSIZE - 1),
                        (fdp.ConsumeIntInRange(0, 2**64 - 1) if fdp.ConsumeBool() else fdp.ConsumeIntInRange(tv.RXBUF, tv.RAM),
                         fdp.ConsumeIntInRange(0, 4096) if fdp.ConsumeIntInRange(0, 3) else fdp.ConsumeIntInRange(0, 2**32 - 1),
                         fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, tv.QSIZE + 1))))
        else:
            ops.append(("jump", fdp.ConsumeIntInRange(0, 1), (1, tv.QSIZE + 1, 0x8000)[fdp.ConsumeIntInRange(0, 2)]))
    return mask, ops


def test_one_input(data: bytes) -> None:
    mask, ops = plan(data)
    worlds = []
    try:
        worlds = [world(False, mask), world(True, mask)]
        for w in worlds:
            tv.play(w, ops)
    except KvmpyError:
        return
    finally:
        for w in worlds:
            w.mem.check_guards()
        drained = [w.tap.drain() for w in worlds]
        if FRESH:
            for w in worlds:
                w.tap.dev_end.close()
                w.tap.host.close()
    py, c = worlds
    for what, a, b in (("used entries and ctrl replies", py.seen, c.seen), ("breakage", py.dev.broken, c.dev.broken),
                       ("warnings", py.logs, c.logs), ("counters", py.net.stats, c.net.stats),
                       ("frames sent to the TAP", drained[0], drained[1])):
        if a != b:
            raise AssertionError(f"the Python and C net paths differ in {what}:\n  python {a}\n  c      {b}")
    # compared in place: copying each world's 1 MiB of RAM was a third of an input's time
    if not np.array_equal(np.frombuffer(py.mem.buffer(0, tv.RAM), np.uint8), np.frombuffer(c.mem.buffer(0, tv.RAM), np.uint8)):
        raise AssertionError("the Python and C net paths left different guest RAM")


def seeds() -> common.Seeds:
    yield bytes(40)
    yield bytes([0, 4, 1, 0, 200, 1, 3, 8, 8, 10, 1]) * 4


if __name__ == "__main__":
    common.main(test_one_input, seeds)
