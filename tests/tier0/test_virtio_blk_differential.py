"""The C virtio-blk data path against the Python one, byte for byte (no /dev/kvm).

Random request streams, from plain reads and writes to hostile rings (descriptor pokes, loops,
buffers over the rings themselves or past RAM, avail jumps, odd header and status layouts), are
played by the mock driver on two identical worlds, one on each path. Guest RAM, the image file,
the used entries seen after every notify, the device's saved state, whether it broke and every
warning logged must all match.
"""
from __future__ import annotations

import logging
import random
import signal
import struct
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings, strategies as st

from kvmpy.devices.virtio import fastpath
from kvmpy.devices.virtio.blk import T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, DriveSpec, VirtioBlk
from kvmpy.devices.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC
from support.mock_driver import BumpAllocator, MockPciDriver, MockQueue
from kvmpy.devices.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.memslots import GuestMemory

from hypothesis_budget import examples

RAM = 2 << 20
SECTORS = 128
RINGS = 0x10000          # the queue (BumpAllocator puts it here)
HDRS = 0x20000           # request headers, 64 bytes apart
INDIRECT = 0x3C000       # indirect tables, 512 bytes apart
STATUSES = 0x3F000       # status bytes, 16 apart
DATA = 0x40000           # data buffers up to RAM's end
IMAGE = random.Random(5).randbytes(SECTORS * 512)
PATTERN = random.Random(6).randbytes(RAM - DATA)
PLAY_LIMIT_S = 5.0        # one world's whole scenario (normally milliseconds)


def test_c_path_is_built():
    assert fastpath.AVAILABLE, "kvmpy.ioctl._kvm lacks the C virtio-blk loop: rebuild it"


# -- the scenario ------------------------------------------------------------------------------
def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """one_of with weights, so hostile values stay a minority and requests mostly get through."""
    table = [s for weight, s in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda i: table[i])


addr_st = weighted(
    (4, st.integers(DATA // 4096, RAM // 4096 - 4).map(lambda p: p * 4096)),  # page-aligned data
    (3, st.integers(DATA, RAM - 4096 * 3)),                                   # unaligned data
    (1, st.integers(RINGS, RINGS + 0x400)),                                   # over the rings
    (1, st.integers(0, RAM)),
    (1, st.sampled_from([RAM - 1, RAM - 512, RAM - 4096, RAM, 2**64 - 512, 2**63, RAM + 4096])),
)
len_st = weighted((6, st.sampled_from([0, 1, 16, 512, 1024, 4096, 8192])), (3, st.integers(0, 9000)),
                  (1, st.sampled_from([2**32 - 1, 2**31, 4096 * 3])))
# buffers ending just before, at or just past the last byte of RAM
edge_st = (st.sampled_from([0, 1, 2, 16, 512, 4096]) | st.integers(0, 4096)).flatmap(lambda k: st.tuples(st.just(RAM - k), st.sampled_from([max(0, k - 1), k, k + 1])))
seg_st = weighted((6, st.tuples(addr_st, len_st)), (1, edge_st))
sector_st = st.one_of(st.integers(0, SECTORS + 2), st.sampled_from([SECTORS - 1, SECTORS, SECTORS + 1, 2**55, 2**64 - 1]),
                      st.integers(0, 2**64 - 1))


@st.composite
def request_op(draw):
    """A blk request as a driver would queue it, with every part possibly wrong."""
    rtype = draw(st.sampled_from([T_IN, T_IN, T_IN, T_OUT, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD,
                                  T_WRITE_ZEROES, 7]))
    hdr = draw(weighted((3, st.integers(0, 255).map(lambda k: HDRS + 64 * k)), (1, addr_st)))
    layout = draw(st.sampled_from(["plain"] * 5 + ["split", "merged", "short", "none"]))
    data = [(a, n, rtype == T_IN) for a, n in draw(st.lists(seg_st, max_size=6))]
    if data and draw(st.integers(0, 3)) == 0:  # some buffer the wrong way round
        i = draw(st.integers(0, len(data) - 1))
        data[i] = (data[i][0], data[i][1], not data[i][2])
    status = draw(st.sampled_from(["alone"] * 5 + ["merged", "none", "first"]))
    status_addr = draw(weighted((3, st.integers(0, 255).map(lambda k: STATUSES + 16 * k)), (1, addr_st)))
    payload = b""
    if rtype in (T_DISCARD, T_WRITE_ZEROES) and data:
        payload = b"".join(struct.pack("<QII", draw(sector_st), draw(st.integers(0, 8)), draw(st.integers(0, 3)))
                           for _ in range(draw(st.integers(1, 3))))
    return ("req", rtype, draw(sector_st), hdr, layout, data, status, status_addr,
            draw(st.none() | st.integers(0, 7)), payload, draw(st.integers(0, 1024)))


@st.composite
def plain_op(draw):
    """A well-formed read or write in sector-multiple buffers, mostly in range; all of it
    4 KiB aligned, or all but one thing (address, length or disk offset), or anything."""
    rtype = draw(st.sampled_from([T_IN, T_OUT]))
    mode = draw(st.sampled_from(["aligned", "aligned", "addr", "len", "offset", "any"]))
    data = []
    for _ in range(draw(st.integers(1, 5))):
        addr = draw(st.integers(DATA // 4096, RAM // 4096 - 4).map(lambda p: p * 4096)) if mode != "any" \
            else draw(st.integers(DATA, RAM - 4096 * 3))
        size = draw(st.sampled_from([4096, 8192] if mode != "any" else [512, 1024, 4096, 4096, 8192]))
        data.append((addr, size, rtype == T_IN))
    i = draw(st.integers(0, len(data) - 1))
    if mode == "addr":
        data[i] = (data[i][0] + 512, data[i][1], data[i][2])
    elif mode == "len":
        data[i] = (data[i][0], data[i][1] - 512, data[i][2])
    sectors = sum(n for _, n, _ in data) // 512
    in_range = st.integers(0, max(0, SECTORS - sectors)).map(
        lambda x: x if mode == "any" else max(0, (x & ~7) - 1) if mode == "offset" else x & ~7)
    sector = draw(weighted((4, in_range), (1, sector_st)))
    return ("req", rtype, sector, draw(st.integers(0, 255).map(lambda k: HDRS + 64 * k)), "plain", data, "alone",
            draw(st.integers(0, 255).map(lambda k: STATUSES + 16 * k)), draw(st.none() | st.integers(0, 7)), b"",
            "tame")


@st.composite
def big_read_op(draw):
    """A large aligned read or write in page segments, the benchmark's shape (indirect)."""
    n = draw(st.integers(2, 16))
    first = draw(st.integers(DATA // 4096, RAM // 4096 - n - 1))
    rtype = draw(st.sampled_from([T_IN, T_OUT]))
    data = [((first + i) * 4096, 4096, rtype == T_IN) for i in range(n)]
    sector = draw(weighted((4, st.integers(0, SECTORS // 8 - n).map(lambda x: 8 * x)), (1, sector_st)))
    return ("req", rtype, sector, HDRS, "plain", data, "alone", STATUSES, draw(st.none() | st.integers(0, 7)), b"",
            "tame")


# a looping chain built on purpose (random descriptors almost never loop): k descriptors, the
# last pointing back to entry `back`, in the ring or inside an indirect table
loop_op_st = st.tuples(st.just("loop"), st.sampled_from(["direct", "indirect"]), st.integers(1, 16), st.integers(0, 15))
desc_st = st.tuples(st.integers(0, 2**64 - 1) | addr_st, st.integers(0, 2**32 - 1) | len_st,
                    st.integers(0, 7), st.integers(0, 0xFFFF) | st.integers(0, 16))
tame_op_st = weighted((5, plain_op()), (1, request_op()), (2, big_read_op()), (2, st.just(("notify",))))
op_st = st.one_of(
    plain_op(), request_op(), request_op(), big_read_op(), st.just(("notify",)), st.just(("notify",)),
    st.tuples(st.just("desc"), st.integers(0, 15), desc_st),
    st.tuples(st.just("publish"), st.integers(0, 0xFFFF) | st.integers(0, 16)),
    st.tuples(st.just("avail"), st.integers(0, 0xFFFF) | st.integers(0, 3)),
    st.tuples(st.just("jump"), st.sampled_from([0, 1, 2, 0x8000, 0xFFFF])),
    st.tuples(st.just("event"), st.integers(0, 0xFFFF) | st.integers(0, 8)),
    st.tuples(st.just("noint"), st.booleans()),
    st.tuples(st.just("poke"), st.integers(0, RAM - 16) | st.integers(RINGS, RINGS + 0x400), st.binary(min_size=1, max_size=16)),
    loop_op_st, loop_op_st,
)


# requests, then a looping chain notified, then more: both paths must refuse it the same way
looping_ops_st = st.tuples(st.lists(tame_op_st, max_size=8), loop_op_st, st.lists(tame_op_st, max_size=4)).map(
    lambda parts: [*parts[0], parts[1], ("notify",), *parts[2]])


# -- two worlds --------------------------------------------------------------------------------
@dataclass
class World:
    fast: bool
    path: Path
    mem: GuestMemory
    blk: VirtioBlk
    dev: VirtioPciDevice
    q: MockQueue
    indirect: bool
    used: list = field(default_factory=list)
    logs: list = field(default_factory=list)


def build(tmp: Path, fast: bool, qsize: int, features_mask: int, cache: str, readonly: bool) -> World:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "disk.img"
    path.write_bytes(IMAGE)
    mem = GuestMemory.create(RAM)
    mem.write(DATA, PATTERN)
    saved = fastpath.ENABLED
    fastpath.ENABLED = fast  # the transport's queues follow the module switch
    try:
        blk = VirtioBlk(DriveSpec(str(path), readonly, "sn-1", cache), fast=fast)
        dev = VirtioPciDevice(blk, mem)
    finally:
        fastpath.ENABLED = saved
    drv = MockPciDriver(dev, mem, BumpAllocator(RINGS, HDRS))
    assert drv.negotiate(drv.device_features() & ~features_mask)
    q = drv.setup_queue(0, size=qsize)
    drv.driver_ok()
    assert (dev.queues[0].cring is not None) == (blk._cblk is not None) == fast
    return World(fast, path, mem, blk, dev, q, not features_mask & VIRTIO_F_RING_INDIRECT_DESC)


def segments(op: tuple) -> list[tuple[int, int, bool]]:
    _, rtype, sector, hdr, layout, data, status, status_addr, _, _, merged = op
    merged = 0 if merged == "tame" else merged
    segs = {"plain": [(hdr, 16, False)], "split": [(hdr, 5, False), (hdr + 5, 11, False)],
            "merged": [(hdr, 16 + merged, False)], "short": [(hdr, 7, False)], "none": []}[layout]
    segs += data
    if status == "alone":
        segs.append((status_addr, 1, True))
    elif status == "first":  # a writable buffer before readable ones
        segs.insert(0, (status_addr, 1, True))
    elif status == "merged":
        segs.append((status_addr, 1 + merged, True))
    return segs


def apply(w: World, op: tuple) -> None:
    kind = op[0]
    mem, q = w.mem, w.q
    if kind == "req":
        _, rtype, sector, hdr, _, data, _, _, indirect, payload, _ = op
        if mem.contains(hdr, 16):
            mem.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        if payload and mem.contains(data[0][0], len(payload)):
            mem.write(data[0][0], payload)
        segs = segments(op)
        if op[-1] == "tame":  # what a driver does: indirect only when negotiated and it fits
            can_indirect = w.indirect and len(segs) <= q.size
            if indirect is None and len(segs) > len(q.free) and can_indirect:
                indirect = 0
            elif indirect is not None and not can_indirect:
                indirect = None
        if not segs or (indirect is None and len(segs) > len(q.free)) or (indirect is not None and not q.free):
            return
        q.add(segs, indirect_at=None if indirect is None else INDIRECT + 512 * indirect)
    elif kind == "notify":
        w.dev.handle_notify(0)
        w.used.append(q.used())
    elif kind == "desc":
        q.write_desc(op[1] % q.size, *op[2])
    elif kind == "publish":
        q.publish(op[1])
    elif kind == "avail":
        q.set_avail_idx(q.avail_idx + op[1])
    elif kind == "jump":  # size + 0..2 ahead of a device that has caught up: jump by about a ring
        q.set_avail_idx(q.last_used + q.size + op[1])
    elif kind == "event":
        q.set_used_event(op[1])
    elif kind == "noint":
        q.set_no_interrupt(op[1])
    elif kind == "poke":
        mem.write(op[1], op[2])
    elif kind == "loop":
        _, where, k, back = op
        k = min(k, q.size)
        table = None if where == "direct" else INDIRECT + 512 * 8
        for i in range(k):
            q.write_desc(i, DATA + 512 * i, 512, VIRTQ_DESC_F_NEXT, i + 1 if i + 1 < k else back % k, table=table)
        if table is not None:
            q.write_desc(0, table, 16 * k, VIRTQ_DESC_F_INDIRECT)
        q.publish(0)


class _Collect(logging.Handler):
    def __init__(self, world: World):
        super().__init__(logging.WARNING)
        self.world = world

    def emit(self, record: logging.LogRecord) -> None:
        self.world.logs.append(record.getMessage().replace(str(self.world.path), "IMG"))


class WalkerHung(BaseException):
    """Not an Exception on purpose: hypothesis stops at once instead of shrinking (each retry
    of a hanging walker would cost the whole time limit and grow its lists by gigabytes)."""


_PLAYING: list[list[tuple]] = []   # the scenario being played, for the hang message


def _expire(signum, frame):  # type: ignore[no-untyped-def]
    raise WalkerHung(f"a notify did not finish within {PLAY_LIMIT_S} s: a chain walker loops (ops: {_PLAYING[-1]!r})")


def play(w: World, ops: list[tuple]) -> None:
    """Apply `ops`, failing (not hanging) if the device never returns from a notify."""
    handler = _Collect(w)
    logger = logging.getLogger("kvmpy")
    logger.addHandler(handler)
    _PLAYING.append(ops)
    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, PLAY_LIMIT_S)
    try:
        for op in ops:
            apply(w, op)
        apply(w, ("notify",))
    except WalkerHung as hung:
        # drop the walker's locals (gigabytes of list by now): pytest keeps failures' tracebacks
        traceback.clear_frames(hung.__traceback__)
        hung.__traceback__ = None
        message = str(hung)
    else:
        message = None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        _PLAYING.pop()
        logger.removeHandler(handler)
    if message is not None:
        raise WalkerHung(message)


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=weighted((2, st.lists(tame_op_st, min_size=1, max_size=14)), (1, st.lists(op_st, max_size=14)),
                   (1, looping_ops_st)), qsize=st.sampled_from([4, 8, 16]),
       features_mask=st.sampled_from([0, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_RING_EVENT_IDX,
                                      VIRTIO_F_RING_INDIRECT_DESC | VIRTIO_F_RING_EVENT_IDX]),
       cache=st.sampled_from(["writeback", "none"]), readonly=weighted((3, st.just(False)), (1, st.just(True))))
def test_c_and_python_paths_agree(tmp_path_factory, ops, qsize, features_mask, cache, readonly):
    tmp = tmp_path_factory.mktemp("diff")
    worlds = [build(tmp / name, fast, qsize, features_mask, cache, readonly) for name, fast in (("py", False), ("c", True))]
    try:
        for w in worlds:
            play(w, ops)
        py, c = worlds
        done = c.blk._cblk.completed
        event(f"C loop completed {'none' if not done else 'some' if done < 4 else 'many'} requests")
        event(f"device broken: {py.dev.broken}")
        event(f"looping chains built: {'yes' if any(op[0] == 'loop' for op in ops) else 'no'}")
        assert c.used == py.used
        assert c.dev.broken == py.dev.broken
        assert c.logs == py.logs
        assert c.path.read_bytes() == py.path.read_bytes()
        assert c.mem.read(0, RAM) == py.mem.read(0, RAM)
        assert c.dev.state() == py.dev.state()
        assert c.blk.direct_requests == py.blk.direct_requests
    finally:
        for w in worlds:
            w.blk.close()
            w.mem.close()
