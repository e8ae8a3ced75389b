"""The I/O event loop: eventfd readers, thread-safe calls, timers, isolation of failing callbacks."""
import logging
import os
import threading

import pytest

from kvmpy.errors import KvmpyError
from kvmpy.eventloop import EventLoop


@pytest.fixture
def loop():
    lp = EventLoop()
    lp.start()
    yield lp
    lp.close()


def wait(event):
    assert event.wait(5), "event loop did not call back in time"


def test_eventfd_reader_runs_on_loop_thread(loop):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    seen, done = [], threading.Event()

    def on_kick():
        seen.append(threading.current_thread().name)
        done.set()

    loop.add_eventfd(fd, on_kick)
    os.eventfd_write(fd, 1)
    wait(done)
    assert seen == ["kvmpy-io"]
    assert loop.remove_reader(fd) and not loop.remove_reader(fd)
    os.close(fd)


def test_failing_callback_does_not_kill_loop(loop, caplog):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    done = threading.Event()

    def broken():
        raise RuntimeError("device bug")

    loop.add_eventfd(fd, broken)
    with caplog.at_level(logging.ERROR):
        for _ in range(20):
            os.eventfd_write(fd, 1)
            loop.call_soon_threadsafe(lambda: None)
        loop.call_soon_threadsafe(done.set)
        wait(done)
    deadline = threading.Event()
    loop.call_later(0.05, deadline.set)
    wait(deadline)
    assert loop.running and loop.callback_errors >= 1
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) <= 5  # rate-limited
    loop.remove_reader(fd)
    os.close(fd)


def test_call_later_order(loop):
    order, done = [], threading.Event()
    loop.call_later(0.05, lambda: (order.append("late"), done.set()))
    loop.call_later(0.0, order.append, "soon")
    wait(done)
    assert order == ["soon", "late"]


def test_stop_and_double_start():
    lp = EventLoop()
    lp.start()
    with pytest.raises(KvmpyError):
        lp.start()
    lp.close()
    assert not lp.running


def test_add_reader_bad_fd(loop):
    with pytest.raises(KvmpyError):
        loop.add_reader(-1, lambda: None)




def test_double_registration_is_refused_and_removal_is_idempotent(loop):
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        loop.add_eventfd(fd, lambda: None)
        with pytest.raises(KvmpyError, match="already registered"):
            loop.add_reader(fd, lambda: None)
        assert loop.remove_reader(fd) is True
        assert loop.remove_reader(fd) is False
    finally:
        os.close(fd)


def test_reader_removed_after_its_fd_closed_and_loop_keeps_serving(loop):
    dead = os.eventfd(0, os.EFD_NONBLOCK)
    loop.add_eventfd(dead, lambda: None)
    os.close(dead)
    assert loop.remove_reader(dead) is True  # the kernel already forgot it: no error
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    done = threading.Event()
    try:
        loop.add_eventfd(fd, done.set)
        os.eventfd_write(fd, 1)
        wait(done)
    finally:
        loop.remove_reader(fd)
        os.close(fd)
