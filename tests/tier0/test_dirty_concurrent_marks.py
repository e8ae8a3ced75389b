"""The C data path marks GuestMemory's userspace dirty map without the GIL while the migration
thread takes it. A tier-2 CI run failed inside DirtyTracker.take with numpy's `number of non-zero
array elements changed during function execution`: np.flatnonzero counted the live map, a mark
landed, and the fill found one more. take_marks copies and zeroes the window in one step
(kvmpy_dirty_take's atomic word exchange), so numpy only ever reads a private copy.

The writer here is the kernel: os.preadv into the map releases the GIL and stores bytes while
the taker runs, as vqfast.c does. With the old code the first test fails in about a third of its
takes."""
from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np
import pytest

from kvmpy.memslots import GuestMemory
from kvmpy.memslots import dirty as dirty_mod
from kvmpy.memslots.dirty import DirtyTracker, take_marks

from test_migrate_precopy_dirty import FakeVm


@pytest.fixture(params=["c", "python"])
def take_impl(request, monkeypatch):
    """Both implementations of take_marks: the C exchange, and the GIL-only fallback."""
    if request.param == "c":
        if dirty_mod._c_take() is None:
            pytest.fail("the C extension lacks kvmpy_dirty_take (make build)")
    else:
        monkeypatch.setattr(dirty_mod, "_C_TAKE", [None])
    return request.param


def _ones_file(size: int) -> int:
    fd, path = tempfile.mkstemp()
    os.unlink(path)
    os.write(fd, b"\1" * size)
    return fd


def test_a_take_while_marks_land_never_raises():
    """With C (the fallback's premise is that nothing marks outside the GIL)."""
    if dirty_mod._c_take() is None:
        pytest.fail("the C extension lacks kvmpy_dirty_take (make build)")
    memory = GuestMemory.create(512 << 20)          # 128 Ki pages: a switchover's whole window
    try:
        tracker = DirtyTracker(memory, FakeVm(memory, manual=True))
        tracker.start()
        marks = memory.dirty_maps[0]
        fd = _ones_file(len(marks))
        stop = threading.Event()

        def mark_everything() -> None:
            view = memoryview(marks)
            while not stop.is_set():
                os.preadv(fd, [view], 0)            # GIL released: stores race the take

        writer = threading.Thread(target=mark_everything)
        writer.start()
        try:
            deadline = time.monotonic() + 1.0
            takes = 0
            while time.monotonic() < deadline or takes < 50:
                tracker.take(0, 0, len(marks))
                takes += 1
        finally:
            stop.set()
            writer.join()
            os.close(fd)
        assert takes >= 50
    finally:
        memory.close()


def test_no_mark_is_lost_between_takes(take_impl):
    """Every page marked once, one at a time, by a GIL-free writer: the takes together with what
    is left in the map name every page exactly once."""
    pages = 1 << 14
    marks = bytearray(pages)
    fd = _ones_file(1)
    taken = np.zeros(pages, dtype=np.int64)
    done = threading.Event()

    def mark_each_page() -> None:
        view = memoryview(marks)
        for page in range(pages):
            os.preadv(fd, [view[page:page + 1]], 0)
        done.set()

    writer = threading.Thread(target=mark_each_page)
    writer.start()
    try:
        while not done.is_set():
            first = 64 * int(np.random.randint(0, pages // 64))
            taken[first:] += take_marks(marks, first, pages)
            taken[:first] += take_marks(marks, 0, first)
    finally:
        writer.join()
        os.close(fd)
    taken += take_marks(marks, 0, pages)
    assert taken.tolist() == [1] * pages
    assert marks == bytearray(pages)


def test_take_marks_copies_and_zeroes_exactly_its_window(take_impl):
    marks = bytearray(300)
    for page in (0, 63, 64, 65, 130, 299):
        marks[page] = 1
    out = take_marks(marks, 64, 131)
    assert np.flatnonzero(out).tolist() == [0, 1, 66]     # pages 64, 65, 130
    assert [i for i, b in enumerate(marks) if b] == [0, 63, 299]
    assert take_marks(marks, 10, 10).size == 0
