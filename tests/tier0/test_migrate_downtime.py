"""kvmpy.migrate.downtime: the collector is off inside every switchover window and comes back
only when the last one closes, and never comes back on where it was off to begin with."""
from __future__ import annotations

import gc

import pytest

from kvmpy.migrate.downtime import collector_paused


@pytest.fixture(autouse=True)
def collector_restored():
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def test_off_inside_back_after():
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_overlapping_windows_keep_it_off_until_the_last_closes():
    gc.enable()
    first, second = collector_paused(), collector_paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()           # the second window is still open
    second.__exit__(None, None, None)
    assert gc.isenabled()


def test_back_on_after_an_exception():
    gc.enable()
    with pytest.raises(RuntimeError):
        with collector_paused():
            raise RuntimeError("the destination failed")
    assert gc.isenabled()


def test_left_off_where_it_was_off():
    gc.disable()
    with collector_paused():
        pass
    assert not gc.isenabled()
