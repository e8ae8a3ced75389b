"""Issue 13 on the host's KVM: every exit path removes the sockets kvmpy made, --timeout counts
from start-up (a wait that would hang is covered), and outputs open only once the machine is built."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmpy.errors import KvmpyError
from kvmpy.machine import Machine, MachineConfig

GUEST_DIR = Path(__file__).resolve().parents[1] / "guest"
COUNTER = str(GUEST_DIR / "out" / "counter.elf")


def kvmpy(*argv: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvmpy", "boot", "--kernel", COUNTER, "-m", "64M", *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def wait_for(path: Path, timeout: float = 20, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(poll)


def test_a_stop_while_start_builds_the_board_ends_the_machine(kvm_available, tmp_path):
    """What a SIGTERM handler does when it lands inside start(): stop() on the same thread
    while the board is half started. start() must finish, and the machine end with that stop."""
    config = MachineConfig.from_kwargs(COUNTER, memory="64M", serial="null")
    with Machine(config) as m:
        open_consoles = m._open_consoles

        def signal_lands_here() -> None:
            open_consoles()
            m.stop("terminated by SIGTERM", status=143)

        m._open_consoles = signal_lands_here
        m.start()
        end = m.wait(30)
    assert end is not None and (end.status, end.reason) == (143, "terminated by SIGTERM")
    assert m.board is None and m.status == "shutdown"


# delay 0: the signal lands while start() is between binding the sockets and starting the vCPUs
# (the board exists, so the handler stops the machine rather than raising); that once ended in
# "internal error: 'NoneType' object has no attribute 'start'"
@pytest.mark.parametrize("delay", [0.0, 0.3])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_end_the_machine_and_remove_its_sockets(kvm_available, tmp_path, signum, delay):
    serial, hvc = tmp_path / "serial.sock", tmp_path / "hvc.sock"
    proc = kvmpy("--serial", f"unix:{serial}", "--virtio-console", f"unix:{hvc}")
    try:
        wait_for(hvc, poll=0.001)
        time.sleep(delay)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    assert f"terminated by {signal.Signals(signum).name}" in err.decode()
    assert not serial.exists() and not hvc.exists()


def test_a_failing_console_removes_the_other_consoles_socket(kvm_available, tmp_path):
    serial, fifo = tmp_path / "serial.sock", tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = kvmpy("--serial", f"unix:{serial}", "--virtio-console", f"file:{fifo}", "--timeout", "20")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and b"FIFO that nobody reads" in err
    assert not serial.exists()


def test_timeout_covers_a_wait_before_the_guest_starts(kvm_available, tmp_path):
    qmp = tmp_path / "qmp.sock"
    t0 = time.monotonic()
    proc = kvmpy("--serial", "null", "--qmp", f"unix:{qmp},server=on,wait=on", "--timeout", "1.5")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 124, err
    assert time.monotonic() - t0 < 15
    assert b"timed out after 1.5 s" in err and b"Traceback" not in err


def test_timeout_counts_the_running_guest_too(kvm_available, tmp_path):
    log = tmp_path / "serial.log"
    proc = kvmpy("--serial", f"file:{log}", "--timeout", "1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 124 and b"timed out after 1 s" in err
    assert b"tick" in log.read_bytes()


def test_machine_api_creates_its_outputs_only_when_started(kvm_available, tmp_path):
    log, sock = tmp_path / "serial.log", tmp_path / "hvc.sock"
    log.write_bytes(b"previous run\n")
    config = MachineConfig.from_kwargs(COUNTER, memory="64M", serial=f"file:{log}", console=f"unix:{sock}")
    with Machine(config) as m:
        assert log.read_bytes() == b"previous run\n" and not sock.exists()
        m.start()
        assert sock.exists()
        deadline = time.monotonic() + 20
        while b"tick" not in log.read_bytes():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert not sock.exists()


def test_machine_whose_build_fails_keeps_the_log(kvm_available, tmp_path):
    log, bad = tmp_path / "serial.log", tmp_path / "not-a-kernel"
    log.write_bytes(b"previous run\n")
    bad.write_bytes(b"\0" * 4096)
    with Machine(MachineConfig.from_kwargs(str(bad), memory="64M", serial=f"file:{log}")) as m:
        with pytest.raises(KvmpyError):
            m.start()
    assert log.read_bytes() == b"previous run\n"


@pytest.mark.parametrize("device, status", [
    ("isa-debug-exit", 37),                             # QEMU's defaults: 0x501, 2 ports
    ("isa-debug-exit,iobase=0x500,iosize=4", 37),       # the guest's write lands at offset 1
    ("isa-debug-exit,iobase=0xf4,iosize=0x04", 124),    # replaces 0x501: the write goes nowhere
])
def test_isa_debug_exit_as_qemu_places_it(kvm_available, device, status):
    """pvh64.elf ends with a 1-byte write of 0x12 to port 0x501 (status 37)."""
    proc = subprocess.run([sys.executable, "-m", "kvmpy", "boot", "--kernel", str(GUEST_DIR / "out" / "pvh64.elf"),
                           "-m", "64M", "--serial", "null", "--timeout", "1.5", "--device", device],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert proc.returncode == status, proc.stderr


@pytest.mark.parametrize("how", ["string", "file"])
def test_a_guest_reads_fw_cfg_as_under_qemu(kvm_available, tmp_path, how):
    """fw_cfg.elf checks the signature and the DMA bit on the ports, DMAs the first file of the
    directory into RAM and prints it (status 35); without a file it reports failure (255)."""
    blob = tmp_path / "blob"
    blob.write_bytes(b"hello, from the host")
    fw = "name=opt/kvmpy/hello," + ("string=hello,, from the host" if how == "string" else f"file={blob}")
    proc = subprocess.run([sys.executable, "-m", "kvmpy", "boot", "--kernel", str(GUEST_DIR / "out" / "fw_cfg.elf"),
                           "-m", "64M", "--serial", "stdio", "--timeout", "20", "--fw-cfg", fw],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (35, b"FWCFG hello, from the host\n"), proc.stderr
    bare = subprocess.run([sys.executable, "-m", "kvmpy", "boot", "--kernel", str(GUEST_DIR / "out" / "fw_cfg.elf"),
                           "-m", "64M", "--serial", "stdio", "--timeout", "20"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert (bare.returncode, bare.stdout) == (255, b"FWCFG bad\n")


def test_fw_cfg_is_in_the_device_table(kvm_available):
    with Machine(kernel=COUNTER, memory="64M") as m:
        m.start(paused=True)
        row = {d.id: d for d in m.devices}["fw-cfg"]
        assert row.kind == "fw_cfg_io" and str(row.ranges[0]) == "pio 0x510-0x51b"


def test_multiboot_kernel_at_0x8000_with_two_modules_boots(kvm_available):
    """mb_aout_low.bin loads at 0x8000, over kvmpy's usual multiboot tables and stack: the
    tables move above the kernel, and two modules ride along (QEMU's 'a,b')."""
    out = GUEST_DIR / "out"
    proc = subprocess.run([sys.executable, "-m", "kvmpy", "boot", "--kernel", str(out / "mb_aout_low.bin"), "-m", "64M",
                           "--serial", "stdio", "--timeout", "20", "--initrd", f"{out / 'pvh64.o'} x=1,{out / 'mb_elf.o'}"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (35, b"MB-AOUT ok\n"), proc.stderr
