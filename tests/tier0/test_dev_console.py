"""Console backends: raw tty escape handling on a pty, terminal restore, pipes, unix socket."""
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import termios
import threading
import time

import pytest

from kvmpy.devices import console as c
from kvmpy.devices.irq import NullIrqLine
from kvmpy.devices.serial import Serial16550
from kvmpy.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class Target:
    def __init__(self, limit=1 << 20, echo_to=None):
        self.got = bytearray()
        self.limit = limit
        self.echo_to = echo_to
        self.changed = threading.Event()

    def enqueue_input(self, data):
        take = data[:self.limit - len(self.got)]
        self.got += take
        if self.echo_to is not None:
            self.echo_to.write(take)
        self.changed.set()
        return len(take)

    def wait_for_input_space(self, timeout=None):
        time.sleep(timeout or 0)
        return len(self.got) < self.limit


def read_until(fd, needle, timeout=5.0):
    buf = b""
    end = time.monotonic() + timeout
    while needle not in buf and time.monotonic() < end:
        r, _, _ = select.select([fd], [], [], 0.1)
        if r:
            buf += os.read(fd, 4096)
    return buf


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


@pytest.fixture
def pty_pair():
    master, slave = pty.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def test_raw_tty_escape_quit_restores_terminal(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    quit_event = threading.Event()
    target = Target()
    con = c.StdioConsole(stdin_fd=slave, stdout_fd=slave)
    con.start(target, quit_event.set)
    try:
        assert con.raw_mode
        assert not termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
        con.write(b"guest says hi")
        assert b"guest says hi" in read_until(master, b"hi")
        os.write(master, b"ab\x03\x01\x01c\x01h")
        assert b"C-a x" in read_until(master, b"C-a x")
        os.write(master, b"d\x01x")
        assert quit_event.wait(5)
        assert bytes(target.got) == b"ab\x03\x01cd"
        assert termios.tcgetattr(slave) == before      # restored on C-a x already
    finally:
        con.close()
    assert termios.tcgetattr(slave) == before


def test_terminal_restored_when_body_raises(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError):
        with c.StdioConsole(stdin_fd=slave, stdout_fd=slave) as con:
            con.start(Target())
            assert termios.tcgetattr(slave) != before
            raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before


CHILD = """
import sys, time
from kvmpy.devices.console import StdioConsole
con = StdioConsole(stdin_fd=0, stdout_fd=1)
con.start(None)
sys.stderr.write("READY\\n"); sys.stderr.flush()
time.sleep(30)
"""


def test_terminal_restored_on_sigterm(pty_pair):
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-c", CHILD], stdin=slave, stdout=slave,
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": REPO})
    try:
        assert proc.stderr.readline() == b"READY\n"
        assert not termios.tcgetattr(slave)[3] & termios.ICANON
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == -signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert termios.tcgetattr(slave) == before


def test_pipes_pass_through_without_escapes():
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    target = Target()
    con = c.StdioConsole(stdin_fd=in_r, stdout_fd=out_w)
    try:
        con.start(target)
        assert not con.raw_mode
        os.write(in_w, b"a\x01xb")
        os.close(in_w)
        assert wait_for(lambda: bytes(target.got) == b"a\x01xb")
        con.write(b"out")
        con.flush()
        assert os.read(out_r, 10) == b"out"
    finally:
        con.close()
        for fd in (in_r, out_r, out_w):
            os.close(fd)


def test_input_backpressure_feeds_a_uart_without_loss():
    in_r, in_w = os.pipe()
    null_out = os.open(os.devnull, os.O_WRONLY)
    uart = Serial16550(NullIrqLine(), backlog_limit=8)
    con = c.StdioConsole(stdin_fd=in_r, stdout_fd=null_out)
    try:
        con.start(uart)
        payload = bytes(range(256)) * 4
        os.write(in_w, payload)
        got = bytearray()
        end = time.monotonic() + 10
        while len(got) < len(payload) and time.monotonic() < end:
            if uart.read(5, 1)[0] & 1:
                got += uart.read(0, 1)
            else:
                time.sleep(0.001)
        assert got == payload
    finally:
        con.close()
        for fd in (in_r, in_w, null_out):
            os.close(fd)


def test_output_is_batched_and_bounded(tmp_path):
    calls = []

    class Counting(c.FileConsole):
        def _write_out(self, data):
            calls.append(len(data))
            super()._write_out(data)

    path = tmp_path / "out.log"
    con = Counting(str(path), flush_delay_s=0.05, max_pending=600)
    for _ in range(500):
        con.write(b"x")
    con.write(b"y" * 200)              # would exceed max_pending: dropped and counted
    assert con.dropped_bytes == 200
    time.sleep(0.2)
    con.write(b"z")
    con.close()
    assert path.read_bytes() == b"x" * 500 + b"z"
    assert sum(calls) == 501 and len(calls) <= 3


def test_unix_socket_echo_one_client_at_a_time(tmp_path):
    path = str(tmp_path / "con.sock")
    con = c.open_console(f"unix:{path}")
    assert isinstance(con, c.UnixSocketConsole)
    target = Target(echo_to=con)
    con.start(target)
    try:
        a = socket.socket(socket.AF_UNIX)
        a.connect(path)
        assert wait_for(lambda: con.connected)
        a.sendall(b"ping")
        a.settimeout(5)
        assert a.recv(100) == b"ping"
        b = socket.socket(socket.AF_UNIX)
        b.connect(path)
        b.settimeout(5)
        assert b"busy" in b.recv(100)
        b.close()
        a.close()
        assert wait_for(lambda: not con.connected)
        con.write(b"nobody hears this")
        con.flush()
        a = socket.socket(socket.AF_UNIX)
        a.connect(path)
        assert wait_for(lambda: con.connected)
        a.sendall(b"again")
        a.settimeout(5)
        assert a.recv(100) == b"again"
        a.close()
    finally:
        con.close()
    assert not os.path.exists(path)


def test_unix_socket_replaces_stale_and_refuses_live_or_non_socket(tmp_path):
    path = str(tmp_path / "s")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()                       # leaves a socket file nobody listens on
    con = c.open_console(f"unix:{path}")
    try:
        with pytest.raises(ConfigError, match="listening"):
            c.open_console(f"unix:{path}")
    finally:
        con.close()
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="not a socket"):
        c.open_console(f"unix:{plain}")


@pytest.mark.parametrize("spec", ["", "tty", "file:", "unix:", "stdio:x", "null:y",
                                  "file:/nonexistent-dir/x", "unix:/nonexistent-dir/x"])
def test_bad_specs_raise_config_error(spec):
    with pytest.raises(ConfigError):
        c.open_console(spec)


def test_good_specs(tmp_path):
    for spec, kind in (("null", c.NullConsole), ("stdio", c.StdioConsole),
                       (f"file:{tmp_path / 'f'}", c.FileConsole)):
        con = c.open_console(spec)
        assert type(con) is kind
        con.close()
