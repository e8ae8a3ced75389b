"""Split virtqueue: normal use through the mock driver, and hostile rings (no /dev/kvm).
Every test runs twice: the pure-Python walker and the C one (fastpath.ENABLED)."""
import re
import signal
import struct
import traceback

import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from kvmpy.devices.virtio import fastpath
from support.mock_driver import MockQueue
from kvmpy.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, QueueError,
                                        Virtqueue, need_event, slice_segments)
from kvmpy.errors import StateError
from kvmpy.memslots import GuestMemory

from hypothesis_budget import examples

RAM = 1 << 20
QSIZE = 8


pytestmark = pytest.mark.usefixtures("datapath")  # every test on both data paths (conftest.py)


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory.create(RAM)
    yield m
    m.close()


def make(mem, size=QSIZE, event_idx=False, indirect=True):
    mq = MockQueue(mem, 0x1000, size)
    vq = Virtqueue(mem, 0, max_size=size)
    vq.size, vq.desc_addr, vq.avail_addr, vq.used_addr = size, mq.desc_addr, mq.avail_addr, mq.used_addr
    vq.activate(event_idx=event_idx, indirect=indirect)
    assert (vq.cring is not None) == fastpath.ENABLED
    return mq, vq


def test_direct_chain_round_trip(mem):
    mq, vq = make(mem)
    assert vq.pop() is None
    head = mq.add([(0x8000, 16, False), (0x9000, 512, True), (0x9200, 1, True)])
    chain = vq.pop()
    assert chain.head == head
    assert chain.readable == [(0x8000, 16)] and chain.writable == [(0x9000, 512), (0x9200, 1)]
    vq.push(chain, 513)
    assert vq.should_notify()
    assert mq.used() == [(head, 513)]
    assert vq.pop() is None


def test_push_clamps_written_length(mem):
    mq, vq = make(mem)
    mq.add([(0x9000, 10, True)])
    vq.push(vq.pop(), 1 << 31)
    assert mq.used()[0][1] == 10


def test_indirect_chain(mem):
    mq, vq = make(mem)
    head = mq.add([(0x8000, 16, False), (0x9000, 64, True)], indirect_at=0xA000)
    chain = vq.pop()
    assert chain.head == head and chain.readable == [(0x8000, 16)] and chain.writable == [(0x9000, 64)]


def test_indirect_refused_when_not_negotiated(mem):
    mq, vq = make(mem, indirect=False)
    mq.add([(0x8000, 16, False)], indirect_at=0xA000)
    with pytest.raises(QueueError, match=r"indirect descriptor not allowed"):
        vq.pop()


def test_nested_indirect_and_indirect_with_next_rejected(mem):
    mq, vq = make(mem)
    mq.write_desc(0, 0xA100, 16, VIRTQ_DESC_F_INDIRECT, table=0xA000)
    mq.write_desc(0, 0xA000, 16, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    with pytest.raises(QueueError, match=r"indirect descriptor not allowed"):
        vq.pop()
    mq, vq = make(mem)
    mq.write_desc(0, 0xA000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
    mq.publish(0)
    with pytest.raises(QueueError, match=r"indirect descriptor not allowed"):
        vq.pop()


def test_readable_after_writable_rejected(mem):
    mq, vq = make(mem)
    mq.write_desc(0, 0x9000, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    mq.write_desc(1, 0x8000, 4, 0)
    mq.publish(0)
    with pytest.raises(QueueError, match=r"readable descriptor after a writable one"):
        vq.pop()


def test_buffer_ending_at_last_byte_of_ram(mem):
    mq, vq = make(mem)
    mq.add([(RAM - 100, 100, True)])
    assert vq.pop().writable == [(RAM - 100, 100)]
    mq.add([(RAM - 100, 101, True)])
    with pytest.raises(QueueError, match=r"buffer \[0xfff9c\+101\] outside RAM"):
        vq.pop()


def test_no_interrupt_flag(mem):
    mq, vq = make(mem)
    mq.set_no_interrupt(True)
    mq.add([(0x9000, 8, True)])
    vq.push(vq.pop(), 0)
    assert not vq.should_notify()
    mq.set_no_interrupt(False)
    mq.add([(0x9000, 8, True)])
    vq.push(vq.pop(), 0)
    assert vq.should_notify()
    assert not vq.should_notify()  # nothing new since the last interrupt


def test_event_idx(mem):
    mq, vq = make(mem, event_idx=True)
    mq.set_used_event(1)  # driver wants an interrupt once used idx passes 1
    for _ in range(3):
        mq.add([(0x9000, 8, True)])
    vq.push(vq.pop(), 0)
    assert not vq.should_notify()       # used idx 1: event 1 not yet crossed
    assert mq.avail_event == 1
    vq.push(vq.pop(), 0)
    assert vq.should_notify()            # used idx 2 crosses event 1
    vq.push(vq.pop(), 0)
    assert not vq.should_notify()
    assert vq.pop() is None and mq.avail_event == 3


def test_full_fence_between_publishing_and_reading_the_drivers_event(mem, monkeypatch):
    """x86 lets a load pass an earlier store: should_notify must fence between publishing the used
    index and reading used_event (else an interrupt can be lost), and an empty EVENT_IDX pop
    between publishing avail_event and re-reading the avail index (the C walker fences itself)."""
    from kvmpy.devices.virtio import queue as queue_mod
    events: list[str] = []

    class Lib:
        def kvmpy_mb(self) -> None:
            events.append("fence")

    monkeypatch.setattr(queue_mod, "lib", Lib())
    mq, vq = make(mem, event_idx=True)
    mq.add([(0x9000, 8, True)])
    vq.push(vq.pop(), 0)
    events.clear()
    vq.should_notify()
    assert events == ["fence"]
    if vq.cring is None:
        events.clear()
        assert vq.pop() is None and events == ["fence"]


def test_views_of_the_rings_hold_no_buffer_exports(mem):
    """CPython 3.11 crashes later if the garbage collector clears a memoryview that still has
    exports (memory_clear drops its managed buffer, memory_dealloc then dereferences it), so the
    C walker takes addresses and keeps plain references, never exports."""
    mq, vq = make(mem)
    mq.add([(0x9000, 8, True)])
    vq.push(vq.pop(), 0)
    for view in (vq._used16, vq._desc, vq._avail, vq._used, *(vq.cring._anchors if vq.cring is not None else ())):
        view.release()  # BufferError while anything still holds an export of it


def test_need_event_rule():
    assert need_event(0, 1, 0) and not need_event(1, 1, 0) and need_event(0xFFFF, 0, 0xFFFF)


def test_slice_segments():
    segs = [(100, 10), (200, 10), (300, 10)]
    assert slice_segments(segs, 5, 10) == [(105, 5), (200, 5)]
    assert slice_segments(segs, 0, 0) == []
    assert slice_segments(segs, 29, 5) == [(309, 1)]


def test_activate_validates_rings(mem):
    vq = Virtqueue(mem, 0, 8)
    vq.desc_addr, vq.avail_addr, vq.used_addr = 0x1008, 0x2000, 0x3000
    with pytest.raises(QueueError):
        vq.activate()
    vq.desc_addr, vq.used_addr = 0x1000, RAM - 8
    with pytest.raises(QueueError):
        vq.activate()
    vq.used_addr, vq.size = 0x3000, 6
    with pytest.raises(QueueError):
        vq.activate()


def test_state_round_trip(mem):
    mq, vq = make(mem, event_idx=True)
    mq.add([(0x9000, 8, True)])
    vq.push(vq.pop(), 3)
    s = vq.state()
    other = Virtqueue(mem, 0, QSIZE)
    other.restore(s)
    assert other.state() == s
    s.last_avail_idx = 0x1_0000
    with pytest.raises(StateError):
        other.restore(s)
    s.last_avail_idx, s.used_addr = 1, RAM + 0x1000
    with pytest.raises(StateError):
        other.restore(s)


# -- hostile rings ----------------------------------------------------------------------------
# The walker's outcome for any ring is fixed by the rules (virtio 1.2, 2.7.5 and 2.7.5.3): the
# reference walk below states them once, independently of both walkers, and every hostile ring
# must give exactly its chain or exactly its error, on both data paths.
INDIRECT_TABLE = 0xA000
GUARD = 0x20000
POP_LIMIT_S = 1.0


class WalkerHung(BaseException):
    """Not an Exception on purpose: hypothesis stops at once instead of shrinking (each retry
    of a hanging walker would cost the whole time limit and grow its lists by gigabytes)."""


def pop_bounded(vq):
    """vq.pop(), failing (not hanging) if the walker never returns: a loop check gone missing
    in the Python walker spins forever on a looping chain."""
    def expire(signum, frame):
        raise WalkerHung(f"pop() did not return within {POP_LIMIT_S} s: the walker loops")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, POP_LIMIT_S)
    try:
        return vq.pop()
    except WalkerHung as hung:
        message = forget_frames(hung)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    raise WalkerHung(message)


def forget_frames(error: BaseException) -> str:
    """The message of `error`, after dropping its frames' locals: a looping walker's lists are
    gigabytes, and pytest keeps each failure's traceback until the end of the run."""
    traceback.clear_frames(error.__traceback__)
    error.__traceback__ = None
    return str(error)


def reference_walk(mem, desc_addr: int, size: int, head: int, indirect_ok: bool):
    """(readable, writable) for the chain at `head`, or the error detail kvmpy must raise."""
    if head >= size:
        return f"head index {head} >= size {size}"
    table, table_len, nested, idx, count = desc_addr, size, False, head, 0
    readable: list[tuple[int, int]] = []
    writable: list[tuple[int, int]] = []
    while True:
        if idx >= table_len:
            return f"next index {idx} >= table length {table_len}"
        count += 1
        if count > table_len:  # more descriptors than the table holds: it loops
            return "descriptor chain loops or exceeds the table"
        addr, length, flags, nxt = struct.unpack("<QIHH", mem.read(table + 16 * idx, 16))
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect_ok or nested or flags & VIRTQ_DESC_F_NEXT:
                return f"indirect descriptor not allowed here (flags {flags:#x})"
            if length == 0 or length % 16 or length // 16 > size:
                return f"indirect table length {length} invalid"
            if addr + length > RAM:
                return f"indirect table [{addr:#x}+{length}] outside RAM"
            table, table_len, nested, idx, count = addr, length // 16, True, 0, 0
            continue
        if addr + length > RAM:
            return f"buffer [{addr:#x}+{length}] outside RAM"
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append((addr, length))
        elif writable:
            return "readable descriptor after a writable one"
        else:
            readable.append((addr, length))
        if not flags & VIRTQ_DESC_F_NEXT:
            return readable, writable
        idx = nxt


def expected_pops(mem, mq, size: int, indirect_ok: bool):
    """The chains pop() must return in order, then the error it must raise (or None)."""
    avail_idx = mem.read_u16(mq.avail_addr + 2)
    if avail_idx > size:
        return [], f"avail index jumped {avail_idx} entries ahead (size {size})"
    chains = []
    for i in range(avail_idx):
        head = mem.read_u16(mq.avail_addr + 4 + 2 * (i % size))
        result = reference_walk(mem, mq.desc_addr, size, head, indirect_ok)
        if isinstance(result, str):
            return chains, result
        chains.append((head, *result))
    return chains, None


def check_against_reference(mem, mq, vq, indirect_ok: bool = True) -> str | None:
    """Pop everything; the chains and the error must be the reference's. Returns the error."""
    guard = bytes(range(256)) * 4
    mem.write(GUARD, guard)
    chains, error = expected_pops(mem, mq, QSIZE, indirect_ok)
    for head, readable, writable in chains:
        chain = pop_bounded(vq)
        assert chain is not None, (head, readable, writable)
        assert (chain.head, chain.readable, chain.writable) == (head, readable, writable)
        vq.push(chain, 2**32)
    last = vq.last_avail_idx
    if error is None:
        assert pop_bounded(vq) is None
    else:
        with pytest.raises(QueueError) as info:
            pop_bounded(vq)
        assert info.value.detail == error
        assert vq.last_avail_idx == last, "a refused chain must not be consumed"
    assert mq.used() == [(head, sum(n for _, n in w)) for head, _, w in chains]
    assert mem.read(GUARD, len(guard)) == guard  # nothing wrote outside the rings
    return error


desc = st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, RAM), st.integers(0, 2**32 - 1) | st.integers(0, 4096),
                 st.integers(0, 7), st.integers(0, 0xFFFF) | st.integers(0, QSIZE))
OUTSIDE_RAM = [(RAM, 1), (RAM - 8, 9), (2**64 - 8, 16), (2**63, 2**32 - 1), (0x1000, 2**32 - 1)]


@st.composite
def chain_table(draw, slots: list[int], kind: str, writable_ok: bool = True):
    """Descriptors (index, addr, len, flags, next) for one chain through `slots` (in order):
    well formed, looping back to an earlier slot, or with one buffer outside RAM."""
    k = len(slots)
    # a loop is all readable or all writable (else "readable after writable" would come first)
    n_write = 0 if not writable_ok else draw(st.sampled_from([0, k]) if kind == "loop" else st.integers(0, k))
    bad_at = draw(st.integers(0, k - 1))
    out = []
    for pos, i in enumerate(slots):
        addr, length = 0x8000 + 0x200 * i, draw(st.integers(1, 0x200))
        if kind == "out-of-ram" and pos == bad_at:
            addr, length = draw(st.sampled_from(OUTSIDE_RAM))
        flags = VIRTQ_DESC_F_WRITE if pos >= k - n_write else 0
        nxt = slots[pos + 1] if pos + 1 < k else 0
        if pos + 1 < k or kind == "loop":
            flags |= VIRTQ_DESC_F_NEXT
        if pos + 1 == k and kind == "loop":
            nxt = slots[draw(st.integers(0, k - 1))]  # back to any slot, itself included
        out.append((i, addr, length, flags, nxt))
    return out


@st.composite
def hostile_shape(draw):
    """A chain built to be hostile on purpose: (kind, where, direct descs, indirect descs)."""
    kind = draw(st.sampled_from(["loop", "full", "out-of-ram", "table-out-of-ram"]))
    where = draw(st.sampled_from(["direct", "indirect"]))
    order = draw(st.permutations(range(QSIZE)))
    if kind == "table-out-of-ram":
        where = "indirect"
    if where == "direct":
        k = QSIZE if kind == "full" else draw(st.integers(1, QSIZE))
        return kind, where, draw(chain_table(order[:k], kind)), []
    m = draw(st.integers(0, QSIZE - 1))              # readable ring descriptors before the indirect one
    n = QSIZE if kind == "full" else draw(st.integers(1, QSIZE))
    direct = draw(chain_table(order[:m + 1], "full", writable_ok=False))
    i, _, _, _, _ = direct[-1]
    table = INDIRECT_TABLE
    if kind == "table-out-of-ram":  # the indirect table itself lies (partly) outside RAM
        table = draw(st.sampled_from([RAM - 16 * n + 8, RAM, 2**64 - 8, 2**63]))
    direct[-1] = (i, table, 16 * n, VIRTQ_DESC_F_INDIRECT, 0)
    inner = [0, *draw(st.permutations(range(1, n)))]  # an indirect chain starts at entry 0
    return kind, where, direct, draw(chain_table(inner, "full" if kind == "table-out-of-ram" else kind))


EXPECTED_ERROR = {"loop": "descriptor chain loops or exceeds the table", "full": None,
                  "out-of-ram": "outside RAM", "table-out-of-ram": "indirect table ["}


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=hostile_shape(), event_idx=st.booleans())
def test_hostile_shapes_built_on_purpose(mem, shape, event_idx):
    kind, where, direct, indirect = shape
    event(f"{kind} {where}")
    mq, vq = make(mem, event_idx=event_idx)
    for i, addr, length, flags, nxt in indirect:
        mq.write_desc(i, addr, length, flags, nxt, table=INDIRECT_TABLE)
    for i, addr, length, flags, nxt in direct:
        mq.write_desc(i, addr, length, flags, nxt)
    mq.publish(direct[0][0])
    error = check_against_reference(mem, mq, vq)
    if EXPECTED_ERROR[kind] is None:
        assert error is None
    else:
        assert error is not None and EXPECTED_ERROR[kind] in error, (kind, error)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(desc, min_size=QSIZE, max_size=QSIZE),
       heads=st.lists(st.integers(0, QSIZE - 1) | st.integers(0, 0xFFFF), max_size=4),
       avail_jump=st.one_of(st.just(0), st.just(0), st.integers(0, QSIZE + 2), st.integers(0, 0xFFFF)),
       indirect=st.lists(desc, max_size=10), event_idx=st.booleans(), indirect_ok=st.booleans())
def test_hostile_rings_match_the_reference_walk(mem, table, heads, avail_jump, indirect, event_idx, indirect_ok):
    mq, vq = make(mem, event_idx=event_idx, indirect=indirect_ok)
    for i, (addr, length, flags, nxt) in enumerate(indirect):
        mq.write_desc(i, addr, length, flags, nxt, table=INDIRECT_TABLE)
    for i, (addr, length, flags, nxt) in enumerate(table):
        if flags & VIRTQ_DESC_F_INDIRECT and i % 2:
            addr = INDIRECT_TABLE  # make some indirect descriptors point at the crafted table
        mq.write_desc(i, addr, length, flags, nxt)
    for h in heads:
        mq.publish(h)
    if avail_jump:
        mq.set_avail_idx(avail_jump)
    error = check_against_reference(mem, mq, vq, indirect_ok)
    event(f"outcome: {re.sub(r'0x[0-9a-f]+|[0-9]+', 'N', error or 'chains only')}")


@pytest.mark.parametrize("where", ["direct", "indirect"])
@pytest.mark.parametrize("back_to", [0, 3, 7])
def test_loop_is_refused_not_walked_forever(mem, where, back_to):
    mq, vq = make(mem)
    table = INDIRECT_TABLE if where == "indirect" else None
    for i in range(QSIZE):
        mq.write_desc(i, 0x8000 + 0x100 * i, 8, VIRTQ_DESC_F_NEXT, i + 1 if i + 1 < QSIZE else back_to, table=table)
    if where == "indirect":
        mq.write_desc(0, INDIRECT_TABLE, 16 * QSIZE, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    with pytest.raises(QueueError, match=r"descriptor chain loops or exceeds the table"):
        pop_bounded(vq)


@pytest.mark.parametrize("where", ["direct", "indirect"])
def test_a_chain_as_long_as_its_table_is_accepted(mem, where):
    """The bound is exact: table_len descriptors are fine, one more is a loop."""
    mq, vq = make(mem)
    table = INDIRECT_TABLE if where == "indirect" else None
    for i in range(QSIZE):
        mq.write_desc(i, 0x8000 + 0x100 * i, 8, VIRTQ_DESC_F_NEXT if i + 1 < QSIZE else 0, i + 1, table=table)
    if where == "indirect":
        mq.write_desc(0, INDIRECT_TABLE, 16 * QSIZE, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    chain = pop_bounded(vq)
    assert chain.readable == [(0x8000 + 0x100 * i, 8) for i in range(QSIZE)]


@settings(max_examples=examples(100), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, QSIZE * 3))
def test_loops_and_overlong_chains_rejected(mem, n):
    mq, vq = make(mem)
    for i in range(QSIZE):
        mq.write_desc(i, 0x9000, 8, VIRTQ_DESC_F_NEXT, (i + 1) % min(n, QSIZE))
    mq.publish(0)
    with pytest.raises(QueueError, match=r"chain loops"):
        pop_bounded(vq)


@pytest.mark.parametrize("length", [0, 8, 17, 16 * (QSIZE + 1)])
def test_bad_indirect_sizes_rejected(mem, length):
    mq, vq = make(mem)
    mq.write_desc(0, 0xA000, length, VIRTQ_DESC_F_INDIRECT)
    mq.publish(0)
    with pytest.raises(QueueError, match=r"indirect table length"):
        vq.pop()


@pytest.mark.parametrize("addr,length", [(2**64 - 8, 16), (RAM, 1), (0x1000, 2**32 - 1), (2**63, 2**32 - 1)])
def test_addresses_beyond_ram_or_wrapping_rejected(mem, addr, length):
    mq, vq = make(mem)
    mq.write_desc(0, addr, length, VIRTQ_DESC_F_WRITE)
    mq.publish(0)
    with pytest.raises(QueueError, match=r"outside RAM"):
        vq.pop()


def test_avail_index_jump_rejected(mem):
    mq, vq = make(mem)
    mq.set_avail_idx(QSIZE + 1)
    with pytest.raises(QueueError, match=r"avail index jumped 9 entries"):
        vq.pop()
