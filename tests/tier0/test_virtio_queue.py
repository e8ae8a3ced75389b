"""Split virtqueue: normal use through the mock driver, and hostile rings (no /dev/kvm).
Every test runs twice: the pure-Python walker and the C one (fastpath.ENABLED)."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.virtio import fastpath
from kvmpy.devices.virtio.mock_driver import MockQueue
from kvmpy.devices.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, QueueError,
                                        Virtqueue, need_event, slice_segments)
from kvmpy.errors import StateError
from kvmpy.memslots import GuestMemory

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
    for view in (vq._desc, vq._avail, vq._used, *(vq.cring._anchors if vq.cring is not None else ())):
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


# -- hostile rings (property-based) ------------------------------------------------------------
desc = st.tuples(st.integers(0, 2**64 - 1) | st.integers(0, RAM), st.integers(0, 2**32 - 1) | st.integers(0, 4096),
                 st.integers(0, 7), st.integers(0, 0xFFFF) | st.integers(0, QSIZE))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(desc, min_size=QSIZE, max_size=QSIZE), heads=st.lists(st.integers(0, 0xFFFF), max_size=4),
       avail_jump=st.integers(0, 0xFFFF), indirect=st.lists(desc, max_size=10),
       event_idx=st.booleans())
def test_hostile_rings_never_escape(mem, table, heads, avail_jump, indirect, event_idx):
    mq, vq = make(mem, event_idx=event_idx)
    guard = bytes(range(256)) * 4
    mem.write(0x20000, guard)
    for i, (addr, length, flags, nxt) in enumerate(indirect):
        mq.write_desc(i, addr, length, flags, nxt, table=0xA000)
    for i, (addr, length, flags, nxt) in enumerate(table):
        if flags & VIRTQ_DESC_F_INDIRECT and i % 2:
            addr = 0xA000  # make some indirect descriptors point at the crafted table
        mq.write_desc(i, addr, length, flags, nxt)
    for h in heads:
        mq.publish(h)
    if avail_jump:
        mq.set_avail_idx(avail_jump)
    popped = 0
    try:
        while (chain := vq.pop()) is not None:
            popped += 1
            assert popped <= QSIZE + 4, "pop kept returning chains"
            assert len(chain.readable) + len(chain.writable) <= 2 * QSIZE
            for a, n in chain.readable + chain.writable:
                assert mem.contains(a, n)
            vq.push(chain, 2**32)
    except QueueError:
        pass
    assert mem.read(0x20000, len(guard)) == guard  # nothing wrote outside the rings


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(2, QSIZE * 3))
def test_loops_and_overlong_chains_rejected(mem, n):
    mq, vq = make(mem)
    for i in range(QSIZE):
        mq.write_desc(i, 0x9000, 8, VIRTQ_DESC_F_NEXT, (i + 1) % min(n, QSIZE))
    mq.publish(0)
    with pytest.raises(QueueError, match=r"chain loops"):
        vq.pop()


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
