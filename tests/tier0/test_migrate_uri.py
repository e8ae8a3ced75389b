"""Save targets and restore sources: QEMU's URI spelling, file: replaced atomically (a failure
leaves the old file and no temporary), exec: commands' exit statuses, and paths that must be
refused without blocking (a FIFO, a directory, nothing there)."""
from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

from kvmpy.errors import ConfigError, MigrationError
from kvmpy.migrate import uri as uri_module
from kvmpy.migrate.reader import StreamReader, map_file_range
from kvmpy.migrate.stream import SectionKind, StreamWriter
from kvmpy.migrate.uri import MigrationUri, open_restore_source, open_save_target, parse_uri

RAM = np.zeros(16 * 4096, np.uint8)
RAM[5 * 4096:5 * 4096 + 10] = 7


@pytest.mark.parametrize("text, expected", [
    ("file:/tmp/vm.snap", MigrationUri("file", path="/tmp/vm.snap")),
    ("file:relative/with:colon", MigrationUri("file", path="relative/with:colon")),
    ("exec:cat > /tmp/x", MigrationUri("exec", command="cat > /tmp/x")),
    ("exec:zstdcat vm.zst", MigrationUri("exec", command="zstdcat vm.zst")),
    ("tcp:10.0.0.2:4444", MigrationUri("tcp", host="10.0.0.2", port=4444)),
    ("tcp::4444", MigrationUri("tcp", host="", port=4444)),
    ("tcp:[fe80::1]:65535", MigrationUri("tcp", host="fe80::1", port=65535)),
    ("unix:/run/mig.sock", MigrationUri("unix", path="/run/mig.sock")),
])
def test_parse(text, expected):
    parsed = parse_uri(text)
    assert parsed == expected and str(parsed) == text


@pytest.mark.parametrize("text", [
    "", "vm.snap", "/tmp/vm.snap", "file:", "exec:", "exec:   ", "unix:", "tcp:", "tcp:host",
    "tcp:host:", "tcp:host:0", "tcp:host:65536", "tcp:host:80x", "tcp:a:b:80", "tcp:[::1]80",
    "tcp:[::1", "rdma:host:1", "fd:3", "FILE:x", "tcp:host:\u0661\u0662",
])
def test_bad_uris_are_one_config_error(text):
    with pytest.raises(ConfigError) as err:
        parse_uri(text)
    assert "file:PATH, exec:COMMAND, tcp:HOST:PORT or unix:PATH" in str(err.value)


@pytest.mark.parametrize("text", ["tcp:localhost:4444", "unix:/tmp/s"])
def test_live_migration_uris_are_refused_as_streams(text):
    for opener in (open_save_target, open_restore_source):
        with pytest.raises(ConfigError, match="live-migration URI"):
            with opener(text):
                pass


def save(text: str) -> StreamWriter:
    with open_save_target(text) as f:
        writer = StreamWriter(f)
        writer.write_header()
        writer.write_section(SectionKind.CONFIG, b"\x00")
        writer.write_memory([(0, RAM)])
        writer.finish()
    return writer


def restore(text: str) -> tuple[StreamReader, np.ndarray]:
    ram = np.zeros_like(RAM)
    with open_restore_source(text) as f:
        reader = StreamReader(f)
        for section in reader:
            if section.kind in (SectionKind.MEMORY_FILE, SectionKind.MEMORY_RUNS):
                reader.read_memory_into(section, [(0, ram)])
    assert reader.finished
    return reader, ram


def test_file_round_trip_is_sparse_and_mappable(tmp_path):
    path = tmp_path / "vm.snap"
    assert save(f"file:{path}").sparse
    assert os.stat(path).st_mode & 0o777 == 0o600           # it holds guest RAM
    reader, ram = restore(f"file:{path}")
    assert reader.mappable and np.array_equal(ram, RAM)
    assert os.listdir(tmp_path) == ["vm.snap"]


def test_exec_round_trip(tmp_path):
    path = tmp_path / "vm.stream"
    assert not save(f"exec:cat > '{path}'").sparse
    reader, ram = restore(f"exec:cat '{path}'")
    assert not reader.mappable and np.array_equal(ram, RAM)


def test_saving_over_the_snapshot_a_guest_runs_from(tmp_path):
    """A restored guest maps its RAM from the snapshot file: saving to the same path must not
    change what that mapping reads (a new inode is renamed in; the old one lives on)."""
    path = tmp_path / "vm.snap"
    save(f"file:{path}")
    with open_restore_source(f"file:{path}") as f:
        reader = StreamReader(f)
        [memory] = [s for s in reader if s.kind is SectionKind.MEMORY_FILE]
        mapping = map_file_range(f, memory.file_ranges[0])
    RAM[5 * 4096] = 99                                      # the guest ran on and is saved again
    try:
        save(f"file:{path}")
    finally:
        RAM[5 * 4096] = 7
    assert mapping[5 * 4096] == 7 and mapping[5 * 4096 + 9] == 7
    mapping.close()
    assert restore(f"file:{path}")[1][5 * 4096] == 99


def test_file_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "vm.snap"
    path.write_bytes(b"previous snapshot")
    with pytest.raises(MigrationError, match="stream broke"):
        with open_save_target(f"file:{path}") as f:
            f.write(b"half a stream")
            raise MigrationError("stream broke")
    assert path.read_bytes() == b"previous snapshot" and os.listdir(tmp_path) == ["vm.snap"]

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(uri_module.os, "fsync", disk_full)
    with pytest.raises(MigrationError) as err:
        save(f"file:{path}")
    assert err.value.errno == errno.ENOSPC and "saving to file:" in str(err.value)
    assert path.read_bytes() == b"previous snapshot" and os.listdir(tmp_path) == ["vm.snap"]


def test_file_write_error_from_the_writer_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "vm.snap"
    path.write_bytes(b"previous")
    real_write = StreamWriter._write

    def failing_write(self, data):
        if self.bytes_written > 30:
            raise MigrationError("writing the migration stream", errno=errno.ENOSPC)
        real_write(self, data)
    monkeypatch.setattr(StreamWriter, "_write", failing_write)
    with pytest.raises(MigrationError) as err:
        save(f"file:{path}")
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["vm.snap"]


def test_file_save_refusals(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    cases = [(tmp_path, "is a directory"), (tmp_path / "fifo", "not a regular file"),
             (tmp_path / "missing" / "vm.snap", "No such file")]
    for target, message in cases:
        with pytest.raises(MigrationError, match=message):
            with open_save_target(f"file:{target}"):
                pytest.fail("a target was opened")
    assert sorted(os.listdir(tmp_path)) == ["fifo"]


def run_with_timeout(function, timeout_s: float = 5.0):
    """Run `function` in a thread: a regression that blocks fails the test instead of hanging it."""
    outcome: list = []

    def body():
        try:
            outcome.append(function())
        except BaseException as exc:                        # noqa: BLE001 - handed to the test
            outcome.append(exc)
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "blocked"
    return outcome[0]


def test_restore_refuses_fifo_directory_and_missing_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for target, message in [(tmp_path / "fifo", "it is a FIFO"), (tmp_path, "it is a directory"),
                            (tmp_path / "nothing", "No such file or directory")]:
        def attempt(target=target):
            with open_restore_source(f"file:{target}"):
                return "opened"
        result = run_with_timeout(attempt)
        assert isinstance(result, MigrationError) and message in str(result), result


@pytest.mark.parametrize("command, status", [("false", "status 1"), ("exit 3", "status 3"),
                                              ("kill -9 $$", "SIGKILL")])
def test_exec_save_failures_name_the_status(command, status):
    with pytest.raises(MigrationError) as err:
        save(f"exec:{command}")
    assert f"exec:{command}" in str(err.value) and status in str(err.value)


def test_exec_save_command_that_stops_reading_early():
    big = np.ones(4 << 20, np.uint8)
    with pytest.raises(MigrationError, match="exited with status 0 before reading the whole stream"):
        with open_save_target("exec:head -c 10 > /dev/null") as f:
            writer = StreamWriter(f)
            writer.write_header()
            writer.write_memory([(0, big)])
            writer.finish()


@pytest.mark.parametrize("command, message", [
    ("false", "exited with status 1"), ("exit 3", "exited with status 3"),
    ("true", "the stream is empty; the command exited with status 0"), ("echo garbage", "not a kvmpy"),
])
def test_exec_restore_failures(command, message):
    result = run_with_timeout(lambda: restore(f"exec:{command}"))
    assert isinstance(result, MigrationError) and message in str(result), result


def test_exec_restore_command_failing_after_a_partial_stream(tmp_path):
    path = tmp_path / "vm.stream"
    save(f"exec:cat > '{path}'")
    result = run_with_timeout(lambda: restore(f"exec:head -c 100 '{path}'; exit 4"))
    assert isinstance(result, MigrationError) and "exited with status 4" in str(result)
    assert isinstance(result.__cause__, MigrationError) and "truncated" in str(result.__cause__)
