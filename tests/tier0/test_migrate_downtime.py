"""kvmpy.migrate.downtime: the collector is off inside every switchover window and comes back
only when the last one closes, and never comes back on where it was off to begin with; the
state's capture on its thread is written once, only when ready between chunks, its error raised
on the migration thread."""
from __future__ import annotations

import gc
import threading

import pytest

from kvmpy.errors import MigrationError
from kvmpy.migrate.downtime import StateCapture, collector_paused


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


class SectionsWritten:
    def __init__(self):
        self.sections = []

    def write_section(self, kind, payload):
        self.sections.append((kind.name, payload))


def test_the_state_goes_between_chunks_only_once_captured_and_once():
    release = threading.Event()
    capture = StateCapture(lambda: release.wait(10) and b"state")
    writer = SectionsWritten()
    capture.write_if_ready(writer)              # still capturing: the next chunk goes first
    assert writer.sections == [] and not capture.written
    release.set()
    capture.join()
    capture.write_if_ready(writer)
    capture.write_if_ready(writer)
    capture.write(writer)
    assert writer.sections == [("STATE", b"state")] and capture.written


def test_write_waits_for_the_capture():
    release = threading.Event()
    capture = StateCapture(lambda: release.wait(10) and b"late")
    writer = SectionsWritten()
    threading.Timer(0.05, release.set).start()
    capture.write(writer)
    assert writer.sections == [("STATE", b"late")]


def test_a_failed_capture_is_raised_on_the_migration_thread_and_nothing_written():
    def capture():
        raise MigrationError("migrating", detail="the guest rebooted during the migration")
    state = StateCapture(capture)
    writer = SectionsWritten()
    state.join()
    with pytest.raises(MigrationError, match="rebooted"):
        state.write_if_ready(writer)
    assert writer.sections == [] and not state.written


def test_gil_handoffs_are_quick_inside_windows_and_as_before_after():
    import sys
    from kvmpy.migrate.downtime import SWITCHOVER_SWITCH_INTERVAL_S, quick_gil_handoffs
    before = sys.getswitchinterval()
    first, second = quick_gil_handoffs(), quick_gil_handoffs()
    first.__enter__()
    second.__enter__()
    assert sys.getswitchinterval() <= SWITCHOVER_SWITCH_INTERVAL_S < before
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() <= SWITCHOVER_SWITCH_INTERVAL_S     # the other window still open
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before
