"""Boot L1 (Debian 6.1 under QEMU TCG with AMD SVM/NPT) and run a command in it.

This host's /dev/kvm is PVM, which cannot boot a stock kernel; L1 gives tests a hardware-style
KVM (kvm_amd) instead. L1 has no root filesystem of its own: it chroots into the host root
(9p, read-only, tmpfs overlay), so the host's Python, venv and checkout sit at the same paths.
A scratch folder (command, environment, exit status) and .cache/nested are shared read-write.
Optionally a raw image is attached as L1's only virtio disk (/dev/vda, snapshot=on so L1 never
changes the file): a real block device for what 9p and tmpfs lack, such as O_DIRECT.

The QEMU process group is killed on every exit path: timeouts, errors and Ctrl-C.
"""
from __future__ import annotations

import logging
import os
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Mapping

from kvmpy.errors import NestedError
from kvmpy.nested import initscripts, watch
from kvmpy.nested.images import build_l1_initramfs
from kvmpy.nested.kernel import cache_root, module_index, unpack
from kvmpy.nested.l0qemu import SYSTEM_QEMU, l1_qemu

log = logging.getLogger(__name__)

PASSTHROUGH_PREFIXES = ("KVMPY_", "PYTEST_")
PASSTHROUGH_NAMES = ("TERM", "LANG", "LC_ALL", "COLUMNS")
_SAFE_PATH_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+")
# An oops L1's kernel survives but its vCPU thread does not: QEMU's TCG took an interrupt on the
# instruction after VMRUN (GIF should be 0), the handler ran on the guest's GS base and faulted
# until the stack ran out. The thread dies after KVM's CLGI, so that CPU may never take an
# interrupt or NMI again (the lost wakeups): L1 is as good as wedged from this line on.
L1_OOPS_SIGNS = ("BUG: TASK stack guard page was hit",)
OOPS_TRACE_S = 3.0               # the oops's trace is logged for this long before L1 is ended
L1_DISK_DEVICE = "/dev/vda"      # the 9p shares are not block devices: the disk is the only vd*
L1_DISK_SERIAL = "kvmpy-l1disk"


@dataclass
class HarnessConfig:
    """How big L1 is and how long each phase may take."""

    memory_mib: int = 4096
    cpus: int = 2
    boot_timeout_s: float = 180.0
    command_timeout_s: float = 1500.0
    shutdown_grace_s: float = 30.0
    diagnosis_wait_s: float = 60.0   # for a wedged L1's init to dump its task stacks
    qemu: tuple[str, ...] = ()       # the argv that starts L1's QEMU; () = kvmpy.nested.l0qemu's
    echo_boot: bool = False          # also show L1's kernel/init output before the command
    disk: Path | None = None         # raw image attached as L1's /dev/vda (KVMPY_NESTED_DISK)
    extra_env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if not 1024 <= self.memory_mib <= 65536:
            raise NestedError("configuring L1", detail=f"memory {self.memory_mib} MiB out of range")
        if not 1 <= self.cpus <= 16:
            raise NestedError("configuring L1", detail=f"cpus {self.cpus} out of range")
        if min(self.boot_timeout_s, self.command_timeout_s) <= 0:
            raise NestedError("configuring L1", detail="timeouts must be positive")
        if self.disk is not None:
            disk = Path(self.disk)
            _check_share_path(disk)  # it goes into a -drive option: no commas or quotes
            if not disk.is_file():
                raise NestedError("configuring L1", detail=f"disk image {disk} is not a file")


class L1WedgedError(NestedError):
    """L1 stopped making progress (its watch said why); the diagnosis was gathered before QEMU
    was killed, and `progress` tells a tier-2 driver which tests are left."""

    def __init__(self, reason: str, diagnosis: str, progress: watch.Tier2Progress,
                 console_log: Path):
        super().__init__("running a command in L1",
                         detail=f"L1 stopped making progress: {reason}; console log: {console_log}")
        self.reason = reason
        self.diagnosis = diagnosis
        self.progress = progress
        self.console_log = console_log


@dataclass
class NestedResult:
    """What one L1 run did; times are seconds since QEMU started (None if never reached)."""

    rc: int
    init_s: float | None
    ready_s: float | None
    command_s: float | None
    total_s: float
    console_log: Path

    def timings(self) -> str:
        def fmt(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.1f}s"
        return (f"L1 boot to init {fmt(self.init_s)}, to ready {fmt(self.ready_s)}, "
                f"command {fmt(self.command_s)}, total {fmt(self.total_s)}")


def _check_share_path(path: Path) -> str:
    text = str(path)
    if not path.is_absolute() or not set(text) <= _SAFE_PATH_CHARS:
        raise NestedError("sharing a folder into L1",
                          detail=f"{text!r}: needs an absolute path of [A-Za-z0-9/._+-]")
    return text


def _kill_group(proc: subprocess.Popen[bytes], own_group: bool) -> None:
    if proc.poll() is not None:
        return
    try:
        if own_group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


class L1Harness:
    """One L1 boot per `run()` or `shell()`; nothing survives between them."""

    def __init__(self, config: HarnessConfig | None = None):
        self.config = config or HarnessConfig()
        self.config.validate()
        if not self.config.qemu:
            self.config.qemu = tuple(l1_qemu().argv())
        if shutil.which(self.config.qemu[0]) is None:
            raise NestedError("starting L1", detail=f"{self.config.qemu[0]} is not installed "
                              "(make deps installs qemu-system-x86)")
        self.kernel = unpack()
        self.initrd = build_l1_initramfs(self.kernel)
        self.log_dir = cache_root() / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def _qemu_argv(self, scratch: Path, mode: str, interactive: bool, mux: bool = True) -> list[str]:
        cache = cache_root()
        # nokaslr: saved kallsyms then name the addresses a wedged L1's vCPUs sit at (watch.py)
        append = ["console=ttyS0", "panic=-1", "quiet", "loglevel=1", "nokaslr",
                  f"kvmpy.scratch={_check_share_path(scratch)}",
                  f"kvmpy.cache={_check_share_path(cache)}", f"kvmpy.mode={mode}",
                  *os.environ.get("KVMPY_L1_APPEND", "").split()]   # experiments with L1's kernel
        argv = [*(self.config.qemu or (SYSTEM_QEMU,)), "-accel", "tcg,thread=multi", "-cpu", "max",
                "-smp", str(self.config.cpus), "-m", f"{self.config.memory_mib}M",
                "-M", "pc", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-kernel", str(self.kernel.vmlinux), "-initrd", str(self.initrd),
                "-append", " ".join(append)]
        if interactive and mux:
            argv += ["-chardev", "stdio,id=con,mux=on,signal=off",
                     "-serial", "chardev:con", "-mon", "chardev=con"]
        elif interactive:
            argv += ["-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con"]
        else:
            argv += ["-serial", "stdio"]
        shares = [("hostroot", "/", True), ("scratch", str(scratch), False),
                  ("cache", str(cache), False)]
        for tag, path, readonly in shares:
            fsdev = f"local,id={tag},path={path},security_model=none,multidevs=remap"
            argv += ["-fsdev", fsdev + (",readonly=on" if readonly else ""),
                     "-device", f"virtio-9p-pci,fsdev={tag},mount_tag={tag}"]
        monitor = self._monitor_path(scratch, interactive, mux)
        if monitor is not None:
            # QEMU's HMP monitor of L1 on a Unix socket: `info registers -a` shows where an L1
            # that stopped making progress spins (watch.diagnose samples and symbolizes it)
            argv += ["-monitor", f"unix:{monitor},server=on,wait=off"]
        if self.config.disk is not None:
            drive = f"file={_check_share_path(Path(self.config.disk))},format=raw,if=none,id=l1disk"
            argv += ["-drive", drive + ",snapshot=on",
                     "-device", f"virtio-blk-pci,drive=l1disk,serial={L1_DISK_SERIAL}"]
        return argv

    @staticmethod
    def _monitor_path(scratch: Path, interactive: bool, mux: bool) -> Path | None:
        """KVMPY_L1_MONITOR if set (to look yourself), else one in scratch for run mode."""
        if interactive and mux:
            return None          # the monitor is on the terminal already (Ctrl-A c)
        given = os.environ.get("KVMPY_L1_MONITOR")
        if given:
            return Path(given)
        return None if interactive else scratch / watch.MONITOR_SOCKET

    def _write_scratch(self, scratch: Path, command: str, cwd: Path,
                       env: Mapping[str, str]) -> None:
        exports = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOME": "/root", "LANG": "C.UTF-8", "PYTHONUNBUFFERED": "1",
                   "KVMPY_IN_NESTED": "1", "KVMPY_NESTED_SCRATCH": str(scratch)}
        if self.config.disk is not None:
            exports["KVMPY_NESTED_DISK"] = L1_DISK_DEVICE
        for name, value in env.items():
            if name in PASSTHROUGH_NAMES or name.startswith(PASSTHROUGH_PREFIXES):
                exports[name] = value
        exports.update(self.config.extra_env)
        lines = [f"export {k}={shlex.quote(v)}" for k, v in exports.items() if k.isidentifier()]
        (scratch / "env.sh").write_text("\n".join(lines) + f"\ncd {shlex.quote(str(cwd))}\n")
        (scratch / "cmd.sh").write_text(command + "\n")

    def run(self, command: str, cwd: Path | None = None,
            env: Mapping[str, str] | None = None, out: BinaryIO | None = None,
            watch_factory: Callable[[Path], watch.L1Watch] = watch.L1Watch) -> NestedResult:
        """Boot L1, run `command` (sh syntax) in the chroot at `cwd`, stream its output to
        `out` (default stdout), power off. Raises NestedError if L1 never got ready, and
        L1WedgedError (with a diagnosis) when `watch_factory(scratch)`'s watch says L1 stopped
        making progress."""
        out = out or sys.stdout.buffer
        cwd = (cwd or Path.cwd()).resolve()
        scratch = Path(tempfile.mkdtemp(prefix="kvmpy-nested-", dir="/tmp"))
        console_log = self.log_dir / f"l1-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        try:
            self._write_scratch(scratch, command, cwd, env if env is not None else os.environ)
            argv = self._qemu_argv(scratch, "run", interactive=False)
            with console_log.open("wb") as logf:
                logf.write(("$ " + shlex.join(argv) + "\n").encode())
                result = self._supervise(argv, logf, out, scratch, console_log,
                                         watch_factory(scratch))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return result

    def _supervise(self, argv: list[str], logf: BinaryIO, out: BinaryIO, scratch: Path,
                   console_log: Path, l1_watch: watch.L1Watch | None = None) -> NestedResult:
        cfg = self.config
        l1_watch = l1_watch or watch.L1Watch(scratch)
        start = time.monotonic()
        init_s = ready_s = done_s = None
        rc: int | None = None
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        previous_term = _sigterm_interrupts()
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        pending = b""
        failure: str | None = None
        wedged: str | None = None
        diagnosis = ""
        next_check = 0.0
        oops: tuple[float, str] | None = None
        try:
            while True:
                now = time.monotonic() - start
                if oops is not None and rc is None and now - oops[0] > OOPS_TRACE_S:
                    wedged = f"L1's kernel oopsed under the command ({oops[1]})"
                    break
                if ready_s is not None and rc is None and now >= next_check:
                    next_check = now + 1.0
                    wedged = l1_watch.check()
                    if wedged is None and now - ready_s > cfg.command_timeout_s:
                        wedged = f"command still running after {cfg.command_timeout_s:.0f}s"
                    if wedged is not None:
                        failure = f"L1 stopped making progress: {wedged}"
                        diagnosis = self._diagnose(scratch, out, failure,
                                                   quick=l1_watch.heartbeat_stopped)
                        logf.write(diagnosis.encode() + b"\n")
                        break
                if ready_s is None and now > cfg.boot_timeout_s:
                    failure = f"L1 not ready after {cfg.boot_timeout_s:.0f}s"
                    break
                if done_s is not None and now - done_s > cfg.shutdown_grace_s:
                    break  # L1 did not power off in time: kill it, the result is known
                if not sel.select(timeout=1.0):
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    break
                logf.write(chunk)
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for raw in lines:
                    line = raw.rstrip(b"\r")
                    text = line.decode(errors="replace")
                    stamp = time.monotonic() - start
                    if text.startswith("KVMPY-L1-INIT") and init_s is None:
                        init_s = stamp
                    elif text.startswith(initscripts.L1_READY_MARKER) and ready_s is None:
                        ready_s = stamp
                        continue
                    elif text.startswith(initscripts.L1_RC_MARKER) and rc is None:
                        rc = _parse_rc(text[len(initscripts.L1_RC_MARKER):])
                        done_s = stamp
                        continue
                    elif oops is None and ready_s is not None and rc is None and \
                            any(sign in text for sign in L1_OOPS_SIGNS):
                        oops = (stamp, text.strip())
                    elif text.startswith(initscripts.L1_FAIL_MARKER):
                        failure = "L1 setup failed: " + text[len(initscripts.L1_FAIL_MARKER):]
                    elif text.startswith(initscripts.L1_KEYPIN_MARKER) and "failed" in text:
                        # not fatal: tests still run, but L1 may wedge on kernel text patching
                        print("nested: warning: L1 did not hold KVM's static keys ("
                              + text[len(initscripts.L1_KEYPIN_MARKER):].strip().replace(";", "; ")
                              + "): see kvmpy/nested/keypin.py", file=sys.stderr, flush=True)
                    if (ready_s is not None and rc is None) or cfg.echo_boot:
                        out.write(line + b"\n")
                        out.flush()
                if failure:
                    break
        finally:
            _kill_group(proc, own_group=True)
            if previous_term is not None:
                signal.signal(signal.SIGTERM, previous_term)
            sel.close()
            logf.flush()
        total = time.monotonic() - start
        command_s = (done_s - ready_s) if (done_s is not None and ready_s is not None) else None
        if rc is None:
            rc = _read_rc_file(scratch)
        if oops is not None and wedged is not None and not diagnosis:
            diagnosis = "--- L1 console, last lines ---\n" + _tail(console_log, 60)
            out.write(f"\nnested: {wedged}\n{diagnosis}\n".encode(errors="replace"))
            out.flush()
        if wedged is None and rc is None and ready_s is not None and failure is None:
            # L1 itself ended under the command (a kernel panic: panic=-1 and -no-reboot): the
            # same for a tier-2 driver as a wedge, with the console's last lines as diagnosis
            wedged = f"L1 ended under the command (QEMU exit status {proc.returncode})"
            diagnosis = "--- L1 console, last lines ---\n" + _tail(console_log, 60)
            out.write(f"\nnested: {wedged}\n{diagnosis}\n".encode(errors="replace"))
            out.flush()
        if wedged is not None:
            raise L1WedgedError(wedged, diagnosis, l1_watch.progress, console_log)
        if rc is None:
            reason = failure or f"L1 exited (qemu status {proc.returncode}) without a result"
            raise NestedError("running a command in L1",
                              detail=f"{reason}; console log: {console_log}\n"
                                     + _tail(console_log))
        return NestedResult(rc=rc, init_s=init_s, ready_s=ready_s, command_s=command_s,
                            total_s=total, console_log=console_log)

    def _diagnose(self, scratch: Path, out: BinaryIO, failure: str, quick: bool = False) -> str:
        """`quick`: L1's heartbeat stopped, so its init will hardly answer: wait 10 s for it."""
        out.write(f"\nnested: {failure}; asking L1 where it is stuck (about a minute)\n".encode())
        out.flush()
        monitor = self._monitor_path(scratch, interactive=False, mux=False)

        def symbolizer(modules_text: str) -> watch.Symbolizer:
            kernel = getattr(self, "kernel", None)
            if kernel is None:
                return watch.Symbolizer(None, modules_text)
            try:
                paths = module_index(kernel.modules_dir)
            except OSError:
                paths = {}
            # Debian's System.map is a stub; L1's first boot saved its kallsyms (nokaslr)
            return watch.Symbolizer(watch.kallsyms_path(cache_root(), kernel.release),
                                    modules_text, paths)
        try:
            text = watch.diagnose(monitor, scratch, symbolizer,
                                  dump_wait_s=min(10.0, self.config.diagnosis_wait_s) if quick
                                  else self.config.diagnosis_wait_s)
        except Exception as e:  # noqa: BLE001 - a failure path must not hide the failure
            text = f"--- L1 diagnosis failed: {e!r}"
        out.write(text.encode(errors="replace") + b"\n")
        out.flush()
        return text

    def shell(self, command: str | None = None) -> int:
        """An interactive bash in L1's chroot on this terminal (Ctrl-A x quits QEMU); or, with
        `command`, that command on the terminal, with Ctrl-A passed through to it (no QEMU
        monitor mux) so a kvmpy console inside sees its own escape key."""
        scratch = Path(tempfile.mkdtemp(prefix="kvmpy-nested-", dir="/tmp"))
        try:
            self._write_scratch(scratch, command or "exec /bin/bash -i", Path.cwd().resolve(), os.environ)
            argv = self._qemu_argv(scratch, "shell", interactive=True, mux=command is None)
            print("nested: booting L1 (about 10-20 s)"
                  + ("; leave with `exit` or Ctrl-A x" if command is None else ""), file=sys.stderr)
            # Same process group as us: QEMU must own the terminal's foreground to read it.
            proc = subprocess.Popen(argv)
            try:
                return proc.wait()
            finally:
                _kill_group(proc, own_group=False)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _sigterm_interrupts() -> signal.Handlers | None:
    """Make SIGTERM unwind like Ctrl-C (so `finally` kills L1); returns the old handler."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupt)


def _parse_rc(text: str) -> int | None:
    text = text.strip()
    return int(text) if text.isdigit() and len(text) <= 3 else None


def _read_rc_file(scratch: Path) -> int | None:
    try:
        return _parse_rc((scratch / "rc").read_text())
    except OSError:
        return None


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
