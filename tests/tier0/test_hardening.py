"""Issue 13's defects, found by using kvmpy as a careless or hostile user would: every check
runs before any output is opened, inputs are never touched, and each refusal is one clear line.

No /dev/kvm here: everything below is refused before a VM exists (or exercises pure parts)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
from hypothesis import given, strategies as st

from kvmpy.cli import main
from kvmpy.devices import console as c
from kvmpy.devices.virtio.drive import parse_drive_spec, split_options
from kvmpy.errors import ConfigError
from kvmpy.machine import checks
from kvmpy.machine.config import MachineConfig
from kvmpy.memslots import parse_size
from kvmpy.memslots.layout import MAX_RAM

KERNEL_BYTES = b"not a real kernel, but a precious file" * 100


@pytest.fixture
def files(tmp_path):
    """A kernel, a disk image and a log with known contents, and a FIFO."""
    paths = {"kernel": tmp_path / "kernel", "disk": tmp_path / "disk.img", "log": tmp_path / "log",
             "fifo": tmp_path / "fifo"}
    paths["kernel"].write_bytes(KERNEL_BYTES)
    paths["disk"].write_bytes(b"D" * 4096)
    paths["log"].write_bytes(b"yesterday's log\n")
    os.mkfifo(paths["fifo"])
    return paths


def boot(*argv: str) -> int:
    return main(["boot", *argv])


# -- 1: data loss: outputs are checked against the inputs and opened last ---------------------------

def test_serial_file_over_the_kernel_is_refused_and_the_kernel_kept(files, capsys):
    assert boot("--kernel", str(files["kernel"]), "--serial", f"file:{files['kernel']}") == 1
    assert files["kernel"].read_bytes() == KERNEL_BYTES
    assert "it is the kernel" in capsys.readouterr().err


def test_serial_file_over_a_readonly_drive_is_refused(files, capsys):
    link = files["disk"].parent / "same-disk"
    link.symlink_to(files["disk"])          # another name for the same file
    assert boot("--kernel", str(files["kernel"]), "--drive", f"file={files['disk']},readonly=on",
                "--serial", f"file:{link}") == 1
    assert files["disk"].read_bytes() == b"D" * 4096
    assert "an output must not overwrite" in capsys.readouterr().err


def test_a_failed_start_leaves_the_log_and_creates_no_socket(files, tmp_path, capsys):
    sock = tmp_path / "hvc.sock"
    assert boot("--kernel", str(files["kernel"]), "--serial", f"file:{files['log']}",
                "--virtio-console", f"unix:{sock}", "--device", str(tmp_path / "no-kvm")) == 1
    assert files["log"].read_bytes() == b"yesterday's log\n"
    assert not sock.exists()
    assert capsys.readouterr().err.startswith("kvmpy: error:")


def test_lazy_file_console_creates_nothing_until_opened(tmp_path):
    path = tmp_path / "out.log"
    path.write_bytes(b"keep")
    con = c.open_console(f"file:{path}", lazy=True)
    con.write(b"early ")                    # buffered until the console opens
    time.sleep(0.05)
    assert path.read_bytes() == b"keep"
    con.start()
    con.write(b"late")
    con.close()
    assert path.read_bytes() == b"early late"
    never = c.open_console(f"file:{tmp_path / 'never'}", lazy=True)
    never.write(b"x")
    never.close()
    assert not (tmp_path / "never").exists()


def test_lazy_socket_console_binds_on_open_and_unlinks_on_close(tmp_path):
    path = tmp_path / "con.sock"
    con = c.open_console(f"unix:{path}", lazy=True)
    assert not path.exists()
    con.open()
    assert path.exists()
    con.close()
    assert not path.exists()


# -- 2: closed stderr ------------------------------------------------------------------------------

def test_closed_stderr_does_not_stop_the_cli():
    r = subprocess.run(f"{sys.executable} -m kvmpy boot --help 2>&-", shell=True, capture_output=True,
                       timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and b"--kernel" in r.stdout


def test_closed_stderr_does_not_hand_fd_2_to_an_output(tmp_path):
    """With fd 2 closed, the log opened next would get it and receive kvmpy's messages."""
    log = tmp_path / "log"
    r = subprocess.run(f"{sys.executable} -m kvmpy boot --kernel /nonexistent --serial file:{log} 2>&-",
                       shell=True, capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and not log.exists()


# -- 3: inputs that would block open() ---------------------------------------------------------------

def test_fifo_as_a_readonly_drive_is_refused_without_opening_it(files, capsys):
    assert boot("--kernel", str(files["kernel"]), "--drive", f"file={files['fifo']},readonly=on") == 1
    assert "it is a FIFO; a disk image must be a regular file or a block device" in capsys.readouterr().err


def test_fifo_without_reader_as_console_file_fails_at_once(files):
    con = c.open_console(f"file:{files['fifo']}", lazy=True)
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="FIFO that nobody reads"):
        con.open()
    assert time.monotonic() - t0 < 1
    con.close()


def test_fifo_with_a_reader_is_a_console_output(files):
    reader = os.open(files["fifo"], os.O_RDONLY | os.O_NONBLOCK)
    try:
        con = c.open_console(f"file:{files['fifo']}")
        con.write(b"hello")
        con.close()
        assert os.read(reader, 100) == b"hello"
    finally:
        os.close(reader)


# -- 5 and 6: refused values, and messages that say the real reason ----------------------------------

@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e30", "1e30T", "5000T"])
def test_absurd_memory_sizes_are_config_errors(text):
    with pytest.raises(ConfigError, match="is not a size"):
        parse_size(text)


@given(st.text(max_size=12))
def test_parse_size_returns_a_sane_size_or_refuses(text):
    try:
        size = parse_size(text)
    except ConfigError:
        return
    assert 0 < size <= MAX_RAM


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_timeout_must_be_a_finite_non_negative_number(files, value):
    with pytest.raises(ConfigError, match="0: no limit"):
        MachineConfig(kernel=str(files["kernel"]), timeout=value).validate()


def test_empty_initrd_says_empty(files, tmp_path, capsys):
    empty = tmp_path / "initrd"
    empty.write_bytes(b"")
    assert boot("--kernel", str(files["kernel"]), "--initrd", str(empty)) == 1
    err = capsys.readouterr().err
    assert "it is empty (0 bytes)" in err and "more memory" not in err


@pytest.mark.parametrize("make, reason", [
    (lambda d: d, "it is a directory"),
    (lambda d: d / "fifo", "it is a FIFO"),
    (lambda d: "/dev/null", "it is a character device"),
    (lambda d: d / "loop", "a loop of symbolic links"),
    (lambda d: d / "missing", "no such file"),
])
def test_kernel_and_initrd_refusals_name_the_reason(files, tmp_path, capsys, make, reason):
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    bad = str(make(tmp_path))
    assert boot("--kernel", bad) == 1
    assert boot("--kernel", str(files["kernel"]), "--initrd", bad) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(reason in line and line.startswith("kvmpy: error:") for line in lines)


def test_one_image_twice_is_not_another_vm(files, capsys):
    link = files["disk"].parent / "alias.img"
    os.link(files["disk"], link)
    assert boot("--kernel", str(files["kernel"]), "--drive", f"file={files['disk']}", "--drive", f"file={link}") == 1
    err = capsys.readouterr().err
    assert "already this VM's drive" in err and "another VM" not in err


def test_one_socket_for_both_consoles_is_named_as_such(files, tmp_path, capsys):
    sock = tmp_path / "s.sock"
    assert boot("--kernel", str(files["kernel"]), "--serial", f"unix:{sock}", "--virtio-console", f"unix:{sock}") == 1
    err = capsys.readouterr().err
    assert "--serial and --virtio-console both name the socket" in err and not sock.exists()


def test_overlong_socket_path_says_why(files, tmp_path, capsys):
    long_path = "/tmp/" + "s" * 120
    assert boot("--kernel", str(files["kernel"]), "--serial", f"unix:{long_path}") == 1
    assert "a unix socket path may have at most 107" in capsys.readouterr().err


def test_socket_path_holding_a_file_is_refused_before_anything(files, capsys):
    assert boot("--kernel", str(files["kernel"]), "--serial", f"unix:{files['log']}") == 1
    assert files["log"].read_bytes() == b"yesterday's log\n"
    assert "not a socket" in capsys.readouterr().err


def test_info_errors_have_the_error_prefix(tmp_path, capsys):
    assert main(["info", "--device", str(tmp_path / "no-kvm")]) == 1
    assert capsys.readouterr().err.startswith("kvmpy: error: ")


# -- 7: partial sectors, empty console specs, one memory rule ------------------------------------------

def test_image_with_a_partial_sector_is_warned_about(tmp_path, caplog):
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)
    with caplog.at_level(logging.WARNING, logger="kvmpy.machine.checks"):
        checks.check_drives([str(odd)])
    assert "not a multiple of 512" in caplog.text and "last 488 bytes" in caplog.text


@pytest.mark.parametrize("flag", ["--serial", "--virtio-console"])
def test_empty_console_spec_is_an_error_for_both_consoles(files, capsys, flag):
    assert boot("--kernel", str(files["kernel"]), flag, "") == 1
    err = capsys.readouterr().err
    assert err.startswith("kvmpy: error: parsing") and "spec" in err


@pytest.mark.parametrize("backend", ["memfd", "anon", "auto"])
def test_one_memory_rule_for_every_backend(files, tmp_path, backend):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:        1048576 kB\nSwapTotal:        524288 kB\n")
    checks.check_host_memory(1536 << 20, str(meminfo))
    with pytest.raises(ConfigError, match="more than this host's 1536 MiB of RAM and swap"):
        checks.check_host_memory((1536 << 20) + 4096, str(meminfo))
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with pytest.raises(ConfigError, match="more than this host"):
        MachineConfig(kernel=str(files["kernel"]), memory=64 * host, mem_backend=backend).validate()


# -- 8: QEMU's comma escaping ----------------------------------------------------------------------------

def test_double_comma_is_a_literal_comma():
    assert parse_drive_spec("file=a,,b.img,readonly=on") == parse_drive_spec("readonly=on,file=a,,b.img")
    spec = parse_drive_spec("file=a,,b.img,readonly=on")
    assert spec.file == "a,b.img" and spec.readonly
    quiet = parse_drive_spec("file=X,,readonly=on")
    assert quiet.file == "X,readonly=on" and not quiet.readonly


@given(st.text(alphabet=st.sampled_from(",=/. aé") | st.characters(blacklist_categories=("Cs",),
                                                                   blacklist_characters="\0"), min_size=1))
def test_any_file_name_survives_escaping(name):
    spec = parse_drive_spec("readonly=on,file=" + name.replace(",", ",,") + ",serial=s")
    assert spec.file == name and spec.readonly and spec.serial == "s"


def test_split_options_matches_qemu():
    assert split_options("a=1,,2,b=3") == ["a=1,2", "b=3"]
    assert split_options("a=,,,,") == ["a=,,"]
    assert split_options("a=1,,,b=2") == ["a=1,", "b=2"]


def test_a_key_given_twice_is_refused():
    with pytest.raises(ConfigError, match="given twice"):
        parse_drive_spec("file=a,readonly=on,readonly=off")


# -- --qmp sockets are checked against the other paths before anything is opened ------------------

@pytest.mark.parametrize("other", ["--serial", "--virtio-console", "--qmp", "--incoming"])
def test_a_qmp_socket_sharing_a_path_is_named_as_such(files, tmp_path, capsys, other):
    sock = tmp_path / "one.sock"
    value = {"--serial": f"unix:{sock}", "--virtio-console": f"unix:{sock}", "--incoming": f"unix:{sock}",
             "--qmp": f"unix:{sock},server=on,wait=off"}[other]
    assert boot("--kernel", str(files["kernel"]), "--qmp", f"unix:{sock},server=on,wait=off", other, value) == 1
    err = capsys.readouterr().err
    assert err.startswith("kvmpy: error:") and "both name" in err and "listening" not in err, err
    assert not sock.exists()


def test_a_qmp_socket_over_an_input_is_refused_and_the_input_kept(files, capsys):
    assert boot("--kernel", str(files["kernel"]), "--qmp", f"unix:{files['kernel']},server=on,wait=off") == 1
    assert "it is the kernel" in capsys.readouterr().err
    assert files["kernel"].read_bytes() == KERNEL_BYTES


def test_a_bad_qmp_spec_is_refused_before_anything(files, capsys):
    assert boot("--kernel", str(files["kernel"]), "--serial", f"file:{files['log']}", "--qmp", "bogus:x") == 1
    assert "not a valid char driver name" in capsys.readouterr().err
    assert files["log"].read_bytes() == b"yesterday's log\n"
