"""Live migration's page copies in C (kvmpy/ioctl/pagecopy.c) against their numpy reference in
kvmpy.migrate.pages: the same data pages in the same order, the same zero mask, the same RAM
after a scatter, the same chunks (run table, data, hash) packed from a dirty mask, for any mix
of data and zero pages, repeated and unsorted page numbers included; and page numbers outside
the range refused before any copy."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.migrate import pages as pages_mod
from kvmpy.migrate.pages import PAGE_SIZE, ZERO_RUN, data_hash, gather_pages, pack_marked, scatter_pages

NPAGES = 48


def _c_built() -> None:
    if pages_mod._c_pages() is None:
        pytest.fail("the C extension lacks kvmpy_pages_gather (make venv builds it)")


def _ram(draw, npages: int = NPAGES) -> np.ndarray:
    rows = np.zeros((npages, PAGE_SIZE), dtype=np.uint8)
    for page in range(npages):
        kind = draw.draw(st.sampled_from(["zero", "one byte", "full"]))
        if kind == "one byte":          # a single byte anywhere: the zero test must read it all
            rows[page, draw.draw(st.integers(0, PAGE_SIZE - 1))] = draw.draw(st.integers(1, 255))
        elif kind == "full":            # from a drawn seed: a drawn 4 KiB overran hypothesis' buffer
            rows[page] = _random_bytes(draw.draw(st.integers(0, 2**32 - 1)), PAGE_SIZE)
    return rows


def _random_bytes(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


def _both(fn):
    """fn() with the C copies, then with numpy alone."""
    c = fn()
    saved = pages_mod._C_PAGES
    pages_mod._C_PAGES = [None]
    try:
        reference = fn()
    finally:
        pages_mod._C_PAGES = saved
    return c, reference


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_gather_equals_the_numpy_reference(data):
    _c_built()
    rows = _ram(data)
    numbers = np.array(data.draw(st.lists(st.integers(0, NPAGES - 1), max_size=2 * NPAGES)), dtype=np.int64)

    def gather():
        out = np.full((numbers.size + 1, PAGE_SIZE), 0xAA, dtype=np.uint8)
        zero, held = gather_pages(rows, numbers, out)
        assert np.shares_memory(held, out) or held.size == 0
        return zero.copy(), held.copy()

    (zero, held), (zero_ref, held_ref) = _both(gather)
    expected_zero = ~rows[numbers].any(axis=1) if numbers.size else np.zeros(0, dtype=bool)
    assert zero.tolist() == zero_ref.tolist() == expected_zero.tolist()
    assert np.array_equal(held, held_ref)
    assert np.array_equal(held, rows[numbers][~expected_zero])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_scatter_equals_the_numpy_reference(data):
    _c_built()
    start = _ram(data)
    page_set = data.draw(st.lists(st.integers(0, NPAGES - 1), unique=True, max_size=NPAGES))
    marks = data.draw(st.lists(st.booleans(), min_size=len(page_set), max_size=len(page_set)))
    table = np.array([(p, 1, int(z)) for p, z in zip(page_set, marks)], dtype=np.int64).reshape(-1, 3)
    payload = _random_bytes(data.draw(st.integers(0, 2**32 - 1)), PAGE_SIZE * (len(marks) - sum(marks)))

    def scatter():
        target = start.copy().reshape(-1)
        if table.size:
            scatter_pages(target, table, payload.tobytes())
        return target.reshape(-1, PAGE_SIZE)

    c, reference = _both(scatter)
    assert np.array_equal(c, reference)
    sent = iter(payload.reshape(-1, PAGE_SIZE))
    for page, zero in zip(page_set, marks):
        assert np.array_equal(c[page], np.zeros(PAGE_SIZE, np.uint8) if zero else next(sent))
    untouched = sorted(set(range(NPAGES)) - set(page_set))
    assert np.array_equal(c[untouched], start[untouched])


@pytest.fixture(params=["C", "numpy"])
def copies(request, monkeypatch):
    """Each test twice: with the C copies, and with numpy alone."""
    if request.param == "C":
        _c_built()
    else:
        monkeypatch.setattr(pages_mod, "_C_PAGES", [None])


@pytest.mark.usefixtures("copies")
def test_page_numbers_outside_the_range_copy_nothing():
    rows = np.ones((4, PAGE_SIZE), dtype=np.uint8)
    out = np.zeros((2, PAGE_SIZE), dtype=np.uint8)
    for numbers in ([0, 4], [-1], [1, 2, 3]):        # past the end, negative, more than out holds
        with pytest.raises(ValueError):
            gather_pages(rows, np.array(numbers), out)
    assert not out.any()
    target = rows.copy().reshape(-1)
    with pytest.raises(ValueError):
        scatter_pages(target, np.array([[3, 2, 1]]), b"")      # pages 3 and 4 of a 4-page range
    with pytest.raises(ValueError):
        scatter_pages(target, np.array([[0, 2, 0]]), bytes(PAGE_SIZE))     # 1 page of data for 2
    with pytest.raises(ValueError):     # a good data run, then a zero run past the end: nothing placed
        scatter_pages(target, np.array([[0, 1, 0], [3, 2, 1]]), bytes(PAGE_SIZE))
    with pytest.raises(ValueError):     # data for no data run
        scatter_pages(target, np.array([[0, 1, 1]]), bytes(PAGE_SIZE))
    with pytest.raises(ValueError):     # a negative first page
        scatter_pages(target, np.array([[-1, 1, 1]]), b"")
    assert target.all()


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_pack_marked_equals_the_numpy_reference(data):
    """kvmpy_pages_pack against gathered_chunks(run_table(mask)) with data_hash: the same run
    tables, data pages and hash, chunk by chunk, for any window, mask and chunk size."""
    _c_built()
    rows = _ram(data)
    first = data.draw(st.integers(0, NPAGES))
    mask = np.array(data.draw(st.lists(st.booleans(), max_size=NPAGES - first)), dtype=bool)
    chunk_pages = data.draw(st.integers(1, 9))

    def pack():
        scratch = np.full((chunk_pages, PAGE_SIZE), 0xAA, dtype=np.uint8)
        return [(table.tolist(), held.copy(), h)
                for table, held, h in pack_marked(rows.reshape(-1), mask, first, chunk_pages, scratch)]

    c, reference = _both(pack)
    assert len(c) == len(reference) == -(-int(mask.sum()) // chunk_pages)
    pages_sent = []
    for (table, held, h), (table_ref, held_ref, h_ref) in zip(c, reference):
        assert table == table_ref
        assert np.array_equal(held, held_ref)
        assert h == h_ref == (data_hash(0, held) if held.size else 0)
        for page, count in table:
            run = rows[page:page + (count & ~ZERO_RUN)]
            pages_sent += range(page, page + len(run))
            assert run.any(axis=1).tolist() == [not count & ZERO_RUN] * len(run)
    assert pages_sent == (np.flatnonzero(mask) + first).tolist()


@pytest.mark.usefixtures("copies")
def test_pack_marked_refuses_a_window_outside_the_range():
    ram = np.ones(4 * PAGE_SIZE, dtype=np.uint8)
    scratch = np.zeros((2, PAGE_SIZE), dtype=np.uint8)
    for first, size in ((3, 2), (-1, 1), (5, 0)):
        with pytest.raises(ValueError):
            list(pack_marked(ram, np.ones(size, dtype=bool), first, 2, scratch))
    for chunk_pages in (3, 0):              # a scratch smaller than a chunk; empty chunks
        with pytest.raises(ValueError):
            list(pack_marked(ram, np.ones(4, dtype=bool), 0, chunk_pages, scratch))
    assert not scratch.any()
