"""Live migration's page copies in C (kvmpy/ioctl/pagecopy.c) against their numpy reference in
kvmpy.migrate.pages: the same data pages in the same order, the same zero mask, the same RAM
after a scatter, for any mix of data and zero pages, repeated and unsorted page numbers
included; and page numbers outside the range refused before any copy."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvmpy.migrate import pages as pages_mod
from kvmpy.migrate.pages import PAGE_SIZE, gather_pages, scatter_pages

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
        elif kind == "full":
            rows[page] = np.frombuffer(draw.draw(st.binary(min_size=PAGE_SIZE, max_size=PAGE_SIZE)), dtype=np.uint8)
    return rows


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
    payload = np.frombuffer(data.draw(st.binary(min_size=PAGE_SIZE * (len(marks) - sum(marks)),
                                                max_size=PAGE_SIZE * (len(marks) - sum(marks)))), dtype=np.uint8)

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


@pytest.mark.parametrize("with_c", [True, False])
def test_page_numbers_outside_the_range_copy_nothing(monkeypatch, with_c):
    if with_c:
        _c_built()
    else:
        monkeypatch.setattr(pages_mod, "_C_PAGES", [None])
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
    assert target.all()
