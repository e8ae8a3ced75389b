"""Tier-2 plumbing: where tier 2 can run on this host, how to start a guest (QEMU or kvmpy)
with a timeout and capture its serial output, and the `make test-tier2` driver.
"""
from __future__ import annotations

import base64
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from kvmpy.errors import NestedError
from kvmpy.nested import initscripts
from kvmpy.nested.progress import L1_LIVELOCK_SIGNATURE  # (defined with the other signs of a broken L1)
from kvmpy.cli.info import host_kvm_kind  # noqa: F401  (re-exported for tests)

COMMAND_LINE_MAX = 2048           # x86 COMMAND_LINE_SIZE
DEFAULT_GUEST_APPEND = "console=ttyS0 panic=-1 reboot=t quiet"
TIER2_DIR = "tests/tier2"
REPORT_WAIT_S = 8.0               # for a timed-out kvmpy's SIGUSR2 report (L1 Python is slow)
REPORT_LAST_LINE = b"exits answered in C so far"


@dataclass(frozen=True)
class Tier2Mode:
    """`inside` (we are in L1), `direct` (hardware KVM here), `nested` (use the harness) or
    `unavailable`; `reason` says why, in words a person can act on."""

    kind: str
    reason: str


def tier2_mode() -> Tier2Mode:
    if os.environ.get("KVMPY_IN_NESTED") == "1":
        return Tier2Mode("inside", "running inside the nested L1 harness")
    kind = host_kvm_kind()
    if kind == "hardware":
        return Tier2Mode("direct", "this host has hardware KVM (vmx/svm)")
    if shutil.which("qemu-system-x86_64"):
        why = "host KVM is PVM" if kind == "pvm" else "host has no hardware KVM"
        return Tier2Mode("nested", f"{why}: tier 2 runs in L1 under QEMU TCG (make test-tier2)")
    return Tier2Mode("unavailable", "no hardware KVM (vmx/svm) and no qemu-system-x86_64 for "
                     "the nested harness: run `make deps` or use a host with vmx/svm")


def tests_can_run_here() -> Tier2Mode | None:
    """None when tier-2 tests may run in this process, else the mode explaining why not."""
    mode = tier2_mode()
    return None if mode.kind in ("inside", "direct") else mode


# --- starting guests -------------------------------------------------------------------

def test_script_arg(script: str) -> str:
    """`kvmpy.test=<base64>` for GUEST_INIT; refuses scripts the command line cannot hold."""
    arg = "kvmpy.test=" + base64.b64encode(script.encode()).decode()
    if len(arg) > COMMAND_LINE_MAX // 2:
        raise NestedError("encoding a guest test script",
                          detail=f"{len(arg)} bytes is too long for the kernel command line; "
                                 "bake it into the initramfs or a disk instead")
    return arg


def qemu_guest_argv(kernel: Path, initrd: Path, append: str = DEFAULT_GUEST_APPEND,
                    machine: str = "pc", memory_mib: int = 512, cpus: int = 1,
                    disk: Path | None = None, extra: Sequence[str] = ()) -> list[str]:
    """QEMU with KVM booting `kernel` (-kernel), serial on stdout, exit on reboot."""
    if machine not in ("pc", "q35", "microvm"):
        raise NestedError("building a QEMU command", detail=f"unknown machine {machine!r}")
    # -tsc-deadline: the same guest-visible timer as kvmpy's default (see --tsc-deadline)
    argv = ["qemu-system-x86_64", "-enable-kvm", "-cpu", "host,-tsc-deadline", "-M", machine,
            "-smp", str(cpus), "-m", f"{memory_mib}M", "-nodefaults", "-no-user-config",
            "-display", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    if disk is not None:
        bus = "virtio-blk-device" if machine == "microvm" else "virtio-blk-pci"
        argv += ["-drive", f"file={disk},format=raw,if=none,id=disk0,snapshot=on",
                 "-device", f"{bus},drive=disk0"]
    return argv + list(extra)


def kvmpy_guest_argv(kernel: Path, initrd: Path, append: str = DEFAULT_GUEST_APPEND,
                     memory: str = "512M", disk: Path | None = None) -> list[str]:
    """kvmpy's own boot command (kvmpy/cli/bootargs.py flags) for tier-2 tests."""
    argv = [sys.executable, "-m", "kvmpy", "boot", "--kernel", str(kernel),
            "--initrd", str(initrd), "--append", append, "--serial", "stdio",
            "--no-reboot", "-m", memory]
    return argv + (["--drive", f"file={disk}"] if disk is not None else [])


@dataclass
class GuestRun:
    """One guest's life: exit status, serial output and when the markers appeared."""

    argv: list[str]
    exit_status: int | None       # the VMM's; None when we killed it
    output: str
    elapsed_s: float
    init_s: float | None          # process start -> KVMPY-INIT-START
    test_rc: int | None           # the guest script's status (KVMPY-TEST-RC=)
    timed_out: bool

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


TRIPLE_FAULT_STATUS = 3         # kvmpy's exit status for a guest that shut down by triple fault


def is_l1_livelock(run: "GuestRun") -> bool:
    """A kvmpy guest that timed out in the known L1 livelock (not a kvmpy failure to judge)."""
    return run.timed_out and run.init_s is None and all(s in run.output for s in L1_LIVELOCK_SIGNATURE)


def l1_artifact(run: "GuestRun") -> str | None:
    """What went wrong below kvmpy, if a kvmpy guest ended the way L1's memory corruption ends
    stock kernels before their init (None otherwise): the #PF livelock, or a triple fault.
    L1 (nested SVM under QEMU TCG) has been seen to lose its guests' writes: a fresh CI boot's
    guest triple-faulted 6 s into its kernel with nothing else failing, and L1 itself panicked
    with corrupted kernel stacks in other runs. A guest that gets as far as its init is judged."""
    if is_l1_livelock(run):
        return "the known L1 #PF livelock before init"
    if (not run.timed_out and run.init_s is None and run.exit_status == TRIPLE_FAULT_STATUS
            and "triple fault" in run.output):
        return "a triple fault before init"
    return None


def run_guest(argv: Sequence[str], timeout_s: float = 120.0, log_path: Path | None = None,
              grace_s: float = 15.0, rerun_livelock: bool = True) -> GuestRun:
    """Run a VMM until it exits, `timeout_s` passes, or `grace_s` after the test-rc marker
    (a guest that fails to power off does not cost a whole timeout). Always reaped.

    A kvmpy guest that ended before its init the way L1's corruption ends guests (l1_artifact:
    the #PF livelock, a triple fault) is run once more, saying so in its output and keeping the
    first run's log beside the second: a second occurrence in a row still fails the test. Guests
    that depend on each other (rerun_livelock=False) are rerun together by their test instead. A
    migration's destination (`--incoming`) is never rerun: its guest came from a source that is
    gone by then, and never prints the init marker, so "before init" cannot be told from a
    migrated guest that fell into the same state (that must fail its test)."""
    first = _run_guest_once(argv, timeout_s, log_path, grace_s)
    what = l1_artifact(first) if (rerun_livelock and _is_kvmpy(argv) and "--incoming" not in argv) else None
    if what is None:
        return first
    if log_path is not None:
        log_path.rename(log_path.with_suffix(".l1-livelock.log"))
    print(f"tier2: the guest hit {what} (L1's, nested SVM under TCG); running it once more "
          f"(first run's log: {log_path.with_suffix('.l1-livelock.log') if log_path else '-'})",
          file=sys.stderr, flush=True)
    second = _run_guest_once(argv, timeout_s, log_path, grace_s)
    second.output = (f"--- first run hit {what} (nested SVM on TCG) and was rerun ---\n"
                     + second.output)
    return second


def _run_guest_once(argv: Sequence[str], timeout_s: float, log_path: Path | None,
                    grace_s: float) -> GuestRun:
    start = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        raise NestedError("starting a guest", errno=e.errno, detail=argv[0]) from e
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    buf = bytearray()
    init_s: float | None = None
    test_rc: int | None = None
    rc_seen_at: float | None = None
    timed_out = False
    scanned = 0
    try:
        while True:
            now = time.monotonic() - start
            if now > timeout_s:
                timed_out = True
                break
            if rc_seen_at is not None and now - rc_seen_at > grace_s:
                break
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            cut = buf.rfind(b"\n")
            if cut < scanned:
                continue
            for raw in bytes(buf[scanned:cut]).split(b"\n"):
                line = raw.decode(errors="replace").strip("\r")
                if init_s is None and line.startswith(initscripts.INIT_START_MARKER):
                    init_s = time.monotonic() - start
                elif test_rc is None and line.startswith(initscripts.TEST_RC_MARKER):
                    value = line[len(initscripts.TEST_RC_MARKER):].strip()
                    test_rc = int(value) if value.isdigit() and len(value) <= 3 else None
                    rc_seen_at = time.monotonic() - start
            scanned = cut + 1
        if timed_out and proc.poll() is None and _is_kvmpy(argv):
            buf += _hang_report(proc, fd, sel)
    finally:
        sel.close()
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        proc.stdout.close()
    exit_status = None if (timed_out or proc.returncode < 0) else proc.returncode
    output = bytes(buf).decode(errors="replace").replace("\r", "")
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("$ " + " ".join(argv) + "\n" + output)
    return GuestRun(list(argv), exit_status, output, time.monotonic() - start,
                    init_s, test_rc, timed_out)


def _is_kvmpy(argv: Sequence[str]) -> bool:
    return any(str(a) == "kvmpy" or str(a).endswith("/kvmpy") for a in argv[:3])


def _hang_report(proc: subprocess.Popen, fd: int, sel: selectors.BaseSelector,
                 wait_s: float = REPORT_WAIT_S) -> bytes:
    """Before a timed-out kvmpy is killed: its SIGUSR2 state report (vCPU registers, irqchips,
    Python stacks) and, from /proc, where each of its threads waits in the kernel."""
    out = bytearray(b"\n--- timed out: kvmpy's state report (SIGUSR2) ---\n")
    threads = []
    for task in sorted(Path(f"/proc/{proc.pid}/task").glob("*")):
        fields = []
        for name in ("comm", "wchan", "stack"):
            try:
                fields.append((task / name).read_text().strip().replace("\n", " | "))
            except OSError:
                fields.append("?")
        threads.append(f"task {task.name}: {' / '.join(fields)}")
    try:
        os.kill(proc.pid, signal.SIGUSR2)
    except ProcessLookupError:
        return bytes(out)
    end = time.monotonic() + wait_s
    while time.monotonic() < end:
        if not sel.select(timeout=0.5):
            if REPORT_LAST_LINE in out:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out += chunk
    out += ("--- its threads in the host kernel (before the report) ---\n"
            + "\n".join(threads) + "\n").encode()
    return bytes(out)
