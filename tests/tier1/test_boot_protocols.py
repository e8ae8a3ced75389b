"""Tier 1: kvmpy's own loaders boot tiny purpose-built kernels on the host's /dev/kvm through the
full machine (irqchip, PIT, legacy devices, PCI), reporting on COM1 and the debug-exit port."""
import re
import subprocess
import sys

import pytest

from support.tinyguest import GUEST_DIR, guest_binary

pytestmark = pytest.mark.usefixtures("kvm_available")


def boot(kernel: str, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    guest_binary("pio_loop")  # builds tests/guest (all guests) when needed
    cmd = [sys.executable, "-m", "kvmpy", "boot", "--kernel", str(GUEST_DIR / "out" / kernel),
           "-m", "64M", "--serial", "stdio", *extra]
    return subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_multiboot_elf_gets_info_and_cmdline():
    r = boot("mb_elf.elf", "--append", "console=ttyS0 tiny=1")
    assert r.stdout == b"MB-ELF cmdline=console=ttyS0 tiny=1\n", r.stderr
    assert r.returncode == 33  # debug-exit value 0x10 -> (0x10 << 1) | 1


def test_multiboot_aout_kludge():
    r = boot("mb_aout.bin")
    assert r.stdout == b"MB-AOUT ok\n", r.stderr
    assert r.returncode == 35


def test_pvh_elf64_reaches_long_mode():
    r = boot("pvh64.elf")
    assert r.stdout == b"PVH64 long mode ok\n", r.stderr
    assert r.returncode == 37


def test_smp_boots_with_the_mp_table():
    r = boot("mb_elf.elf", "--smp", "4", "--append", "x")
    assert r.returncode == 33 and r.stdout.startswith(b"MB-ELF"), r.stderr


@pytest.mark.parametrize("cpus,extra", [(2, []), (4, []), (4, ["--no-acpi"]), (8, [])])
def test_every_ap_starts_once_with_its_own_apic_id(cpus, extra):
    """INIT/STARTUP to all-but-self: each of the N-1 APs must run its trampoline exactly once
    and see its own initial APIC id in CPUID (the guest checks the set of ids; 43 = all there)."""
    r = boot("smp_all.elf", "--smp", str(cpus), "--append", str(cpus), *extra)
    ids = " ".join(str(i) for i in range(1, cpus))
    assert r.stdout == f"SMP APs up: {ids} count={cpus - 1}\n".encode(), (r.stdout, r.stderr)
    assert r.returncode == 43, r.stderr


def test_timeout_ends_a_spinning_guest():
    # With one vCPU the SMP guest polls for an AP that never comes (tens of seconds here).
    r = boot("smp_ap.elf", "--timeout", "1")
    assert r.returncode == 124, r.stderr
    assert b"timed out after 1 s" in r.stderr and b"AP did not start" not in r.stdout


@pytest.mark.parametrize("args,needle", [
    (["--kernel", "/nonexistent/bzImage"], b"no such file"),
    (["--kernel", "/etc/hostname"], b"not"),
    (["--kernel", "/etc/hostname", "--smp", "0"], b"smp"),
    (["--kernel", "/etc/hostname", "-m", "lots"], b"size"),
])
def test_bad_input_is_one_clear_line(args, needle):
    r = subprocess.run([sys.executable, "-m", "kvmpy", "boot", *args, "--serial", "null"],
                       capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(b"kvmpy: error:"), r.stderr
    assert needle in lines[0].lower()
    assert b"Traceback" not in r.stderr


def test_second_vcpu_starts_on_init_sipi():
    """The AP sits in KVM_RUN until the BSP's INIT/STARTUP IPIs; KVM then returns EAGAIN once,
    which the vCPU thread must take as 'run again'."""
    r = boot("smp_ap.elf", "--smp", "2")
    assert r.stdout == b"SMP AP started\n", r.stderr
    assert r.returncode == 39


@pytest.mark.parametrize("mode", ["fast-path", "python-only"])
def test_pci_probe_answers_match_with_and_without_the_c_fast_path(mode):
    """Absent-function probes are answered in C (kvmpy_run_fast); --stats turns that off so
    every exit reaches Python. The guest checks the answers either way."""
    r = boot("pci_probe.elf", *(["--stats"] if mode == "python-only" else ["--log-level", "info"]))
    assert r.stdout == b"PCI probe ok\n", r.stderr
    assert r.returncode == 41
    if mode == "python-only":
        assert b"w 0xcf8 261" in r.stderr  # every 32-bit latch write reached the Python bus
        return
    m = re.search(rb"(\d+) exits answered in C, (\d+) 0xCF8 writes taken from the coalesced ring", r.stderr)
    assert m, r.stderr
    from kvmpy.ioctl import Kvm
    from kvmpy.ioctl._kvm import lib
    with Kvm() as kvm:
        coalescing = kvm.check_extension(lib.KVM_CAP_COALESCED_PIO)
    # With KVM_CAP_COALESCED_PIO the 32-bit latch writes never exit (the 256 absent-slot probes
    # among them); the reads of absent functions are still answered in C.
    assert int(m[2]) >= (256 if coalescing else 0) and int(m[1]) >= 256


def test_drive_locked_by_another_vm_is_refused(tmp_path):
    import fcntl
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    with open(image, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another VM" writing this image
        r = boot("mb_elf.elf", "--drive", f"file={image}")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and b"in use" in lines[0], r.stderr


@pytest.mark.parametrize("spec,needle", [("file=/nonexistent/disk.img", b"no such file"),
                                         ("readonly=on", b"file="),
                                         ("file=x,bogus=1", b"bogus")])
def test_bad_drive_specs_are_one_clear_line(spec, needle):
    r = boot("mb_elf.elf", "--drive", spec)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(b"kvmpy: error:"), r.stderr
    assert needle in lines[0].lower(), lines[0]


def test_acpi_s5_powers_off_with_status_zero():
    r = boot("acpi_off.elf")
    assert r.stdout == b"ACPI S5\n" and r.returncode == 0, r.stderr
    r = boot("acpi_off.elf", "--no-acpi")  # no PM block: the write goes nowhere
    assert r.returncode == 255 and b"still running" in r.stdout


def test_usr2_reports_the_vcpus_and_threads_and_the_guest_runs_on():
    import os
    import signal
    import time
    guest_binary("pio_loop")
    cmd = [sys.executable, "-m", "kvmpy", "boot", "--kernel", str(GUEST_DIR / "out" / "smp_ap.elf"),
           "-m", "64M", "--serial", "stdio", "--timeout", "5", "--log-level", "info"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    early = b""
    while b"vCPU(s) running" not in early:  # the guest now polls for an AP that never comes
        line = proc.stderr.readline()
        assert line, early
        early += line
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=60)
    text = (early + err).decode()
    assert proc.returncode == 124, text  # it ran on to its --timeout after the report
    assert "kvmpy: state report, boot 1" in text and "kvmpy: vCPUs and interrupt controllers" in text
    m = re.search(r"vcpu0: runnable rip=(0x[0-9a-f]+) .* protected-mode", text)
    assert m, text
    assert re.search(r"code: gpa 0x[0-9a-f]+: ([0-9a-f]{2} ){15}[0-9a-f]{2}", text), text
    assert "ioapic: " in text and "pic-master: irr=" in text
    assert "Thread MainThread (most recent call last):" in text and "in write_report" in text
    assert re.search(r"Thread vcpu0 \(most recent call last\):.*in _loop", text, re.S), text
