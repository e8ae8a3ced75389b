"""Tier 0: the ring indices kvmpy writes are never seen half-written by a concurrent reader.

A vCPU (or the C data path, or vhost) reads used->idx, avail_event and the driver-side words
while Python writes them. CPython's struct.pack_into zeroes its target before it stores the
value, so a reader that looks at that moment sees 0: Linux's virtqueue then walks used entries
that were never written ("id N is not a head!"), an avail_event of 0 can swallow a kick, and
kvmpy's own C walker saw the mock driver's avail idx "jump ahead". Here a C loop (GIL released)
spins on the word and counts every value outside the two it may legitimately see.
"""
from __future__ import annotations

import ctypes
import subprocess
import threading
from pathlib import Path

import pytest

from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.memslots import GuestMemory
from support.mock_driver import MockQueue

SPIN_C = r"""
#include <stdint.h>
/* Reads *p until *stop; counts the reads that were neither a nor b. */
long spin16(volatile uint16_t *p, volatile int *stop, uint16_t a, uint16_t b)
{
    long odd = 0;
    while (!*stop) {
        uint16_t v = *p;
        if (v != a && v != b)
            odd++;
    }
    return odd;
}
"""
WRITES = 100_000


@pytest.fixture(scope="module")
def spin16(tmp_path_factory) -> ctypes._CFuncPtr:
    d: Path = tmp_path_factory.mktemp("spin")
    (d / "spin.c").write_text(SPIN_C)
    # cc is one of the project's build dependencies (the tier-1 guests and the C module need it)
    subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(d / "spin.so"), str(d / "spin.c")], check=True)
    fn = ctypes.CDLL(str(d / "spin.so")).spin16
    fn.restype = ctypes.c_long
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint16]
    return fn


def odd_reads(spin16, address: int, a: int, b: int, write) -> int:
    """Run `write` WRITES times while a C thread watches the u16 at `address`."""
    stop = ctypes.c_int(0)
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(spin16(address, ctypes.addressof(stop), a, b)))
    t.start()
    try:
        for _ in range(WRITES):
            write()
    finally:
        stop.value = 1
        t.join(timeout=60)
    assert result, "the spinning reader did not finish"
    return result[0]


def test_guest_memory_word_stores_are_single_stores(spin16):
    mem = GuestMemory.create(1 << 20)
    try:
        mem.write_u16(0x2002, 0x4343)
        address = mem.host_address(0) + 0x2002
        assert odd_reads(spin16, address, 0x4343, 0x4343, lambda: mem.write_u16(0x2002, 0x4343)) == 0
    finally:
        mem.close()


@pytest.mark.parametrize("event_idx", [False, True], ids=["plain", "event-idx"])
def test_used_idx_and_avail_event_are_single_stores(spin16, event_idx):
    """The device's used->idx (push) and avail_event (pop with EVENT_IDX) on the Python walker."""
    mem = GuestMemory.create(1 << 20)
    try:
        mq = MockQueue(mem, 0x1000, 16)
        vq = Virtqueue(mem, 0, max_size=16, fast=False)
        vq.size, vq.desc_addr, vq.avail_addr, vq.used_addr = 16, mq.desc_addr, mq.avail_addr, mq.used_addr
        vq.activate(event_idx=event_idx)
        assert vq.cring is None
        start = 0x4300
        mq.avail_idx = mq.last_used = vq.last_avail_idx = vq.used_idx = start
        mq.set_avail_idx(start)
        mq.add([(0x9000, 8, True)])
        chain = vq.pop()
        assert chain is not None
        state = {"n": 0}

        def push_again() -> None:   # used->idx goes start+1, start, start+1, ...: never 0
            vq.used_idx = start + (state["n"] & 1)
            state["n"] += 1
            vq.push(chain, 0)

        push_again()                               # RAM's used->idx was 0 until now
        used_idx = mem.host_address(0) + mq.used_addr + 2
        assert odd_reads(spin16, used_idx, start + 1, start + 2, push_again) == 0
        if event_idx:
            avail_event = mem.host_address(0) + mq.used_addr + 4 + 8 * 16
            vq.last_avail_idx = mq.avail_idx      # empty ring: each pop publishes avail_event
            assert vq.pop() is None
            assert odd_reads(spin16, avail_event, mq.avail_idx, mq.avail_idx, vq.pop) == 0
    finally:
        mem.close()
