"""Issue 13, least privilege, on the host's KVM: with --sandbox on (the default) a guest boots and
runs, a forbidden call made from each kind of kvmpy thread is refused (EPERM) or kills kvmpy
(SIGSYS), and --runas/--chroot confine a running kvmpy.

The forbidden calls come from kvmpy's own test hook (KVMPY_SANDBOX_SELFTEST=KIND:CALL,...): the
thread of that kind makes the call right after its filter is installed and logs the outcome; a
call that is allowed says ALLOWED, and a kill ends the process with SIGSYS."""
from __future__ import annotations

import errno
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from kvmpy import Machine

GUEST_DIR = Path(__file__).resolve().parents[1] / "guest"
COUNTER = str(GUEST_DIR / "out" / "counter.elf")


@pytest.fixture(scope="module")
def seccomp_host(kvm_available) -> None:
    """This kernel has seccomp (checked from /proc, not by kvmpy)."""
    status = Path("/proc/self/status").read_text()
    if "Seccomp:" not in status:
        pytest.skip("seccomp unavailable: the kernel reports no Seccomp field")


def boot(*argv: str, selftest: str = "", **kw) -> subprocess.Popen:
    env = dict(os.environ, KVMPY_SANDBOX_SELFTEST=selftest)
    return subprocess.Popen([sys.executable, "-m", "kvmpy", "boot", "--kernel", COUNTER, "-m", "64M", *argv],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, **kw)


def qmp(path: Path, *commands: dict, timeout: float = 20) -> list[dict]:
    """Send `commands` after the handshake; the replies (events skipped)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        stream = s.makefile("rwb")
        json.loads(stream.readline())
        replies = []
        for command in ({"execute": "qmp_capabilities"},) + commands:
            stream.write(json.dumps(command).encode() + b"\n")
            stream.flush()
            while True:
                msg = json.loads(stream.readline())
                if "event" not in msg:
                    break
            replies.append(msg)
        return replies[1:]


def test_a_guest_runs_and_forbidden_opens_and_sockets_are_refused(seccomp_host, tmp_path):
    """vCPU, I/O and the monitor's socket thread may not open a file or make a socket: refused
    with EPERM, logged, and the guest runs on to its timeout."""
    calls = [f"{kind}:{call}" for kind in ("vcpu", "io", "qmp-io", "console") for call in ("open", "socket")]
    log = tmp_path / "serial.log"
    proc = boot("--serial", f"file:{log}", "--qmp", f"unix:{tmp_path / 'q.sock'},server=on,wait=off",
                "--timeout", "4", "--log-level", "warning", selftest=",".join(calls))
    out, err = proc.communicate(timeout=60)
    text = err.decode()
    assert proc.returncode == 124, text
    for call in calls:
        kind, _, name = call.partition(":")
        assert f"sandbox self-test ({kind}): {name} refused: Operation not permitted" in text, text
    assert "ALLOWED" not in text
    assert log.read_text().count("tick") > 3          # the guest kept running
    assert not list(Path("/tmp").glob(f"kvmpy-selftest-*-{proc.pid}"))


@pytest.mark.parametrize("kind, call", [
    ("vcpu", "execve"), ("vcpu", "chroot"), ("io", "execve"), ("io", "kvm_run"), ("qmp-io", "execve"),
    ("qmp-io", "kvm_run"), ("monitor", "chroot"), ("machine", "execve"), ("machine", "chroot"),
    ("main", "execve"), ("main", "kvm_run"), ("console", "execve"), ("console", "kvm_run"),
])
def test_a_forbidden_call_from_each_thread_kind_kills_kvmpy(seccomp_host, tmp_path, kind, call):
    proc = boot("--serial", "null", "--qmp", f"unix:{tmp_path / 'q.sock'},server=on,wait=off",
                "--timeout", "20", selftest=f"{kind}:{call}")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGSYS, err.decode()


def seccomp_mode(tid: int) -> int:
    """The kernel's view of one thread: 0 none, 2 filtered (/proc, not kvmpy)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/self/task/{tid}/status").read_text().splitlines())
    return int(fields["Seccomp"])


def test_in_process_machines_filter_their_own_threads_only(seccomp_host):
    """Two machines in one process, built in either order: the one with the sandbox on has its
    vCPU and I/O threads filtered, the other not, and the caller's thread never is."""
    with Machine(kernel=COUNTER, memory="64M") as on, Machine(kernel=COUNTER, memory="64M", sandbox="off") as off:
        on.start()
        off.start()
        for m in (on, off):
            m.console.expect(r"tick 00000001", timeout=20)
        assert seccomp_mode(on.board.vcpu_threads[0].native_id) == 2
        assert seccomp_mode(on.board.loop._thread.native_id) == 2
        assert seccomp_mode(off.board.vcpu_threads[0].native_id) == 0
        assert seccomp_mode(off.board.loop._thread.native_id) == 0
        assert seccomp_mode(threading.get_native_id()) == 0


def test_console_reader_threads_are_filtered(seccomp_host, tmp_path):
    """The unix-socket console's reader (accepting clients) inherits the console filter."""
    serial = tmp_path / "serial.sock"
    proc = boot("--serial", f"unix:{serial}", "--timeout", "20")
    try:
        wait_until(lambda: serial.exists())
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(serial))
            client.settimeout(20)
            assert b"tick" in client.recv(4096) or b"tick" in client.recv(4096)
            tasks = Path(f"/proc/{proc.pid}/task")
            modes = {(t / "comm").read_text().strip(): (t / "status").read_text() for t in tasks.iterdir()}
        assert "kvmpy-console" in modes, sorted(modes)
        assert "Seccomp:\t2" in modes["kvmpy-console"]
        assert all("Seccomp:\t2" in status for comm, status in modes.items() if comm.startswith("kvmpy-"))
    finally:
        proc.kill()
        proc.wait()


def test_start_filtered_runs_on_a_filtered_thread_and_hands_back_errors(seccomp_host):
    from kvmpy import sandbox
    seen: list[object] = []

    def start() -> None:
        try:
            open("/proc/self/status").close()
        except OSError as e:
            seen.append(e.errno)
        seen.append(threading.get_native_id())
        raise ValueError("from the starter")
    with pytest.raises(ValueError, match="from the starter"):
        sandbox.start_filtered("console", sandbox.make_policy("on"), start)
    with pytest.raises(ValueError, match="from the starter"):
        sandbox.start_filtered("console", None, start)         # no policy: inline, unfiltered
    assert seen[0] == errno.EPERM and seen[1] != threading.get_native_id()   # filtered, elsewhere
    assert seen[2:] == [threading.get_native_id()]


def test_the_migration_thread_is_filtered_too(seccomp_host, tmp_path):
    """A QMP migrate starts the migration thread; it may spawn (exec: URIs) but not chroot."""
    sock = tmp_path / "q.sock"
    proc = boot("--serial", "null", "--qmp", f"unix:{sock},server=on,wait=off", "--timeout", "30",
                selftest="migration:chroot")
    try:
        qmp(sock, {"execute": "migrate", "arguments": {"uri": f"exec:cat > {tmp_path / 'vm.snap'}"}})
    except (OSError, ValueError):
        pass                          # killed while answering: the exit status says it all
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGSYS, err.decode()


def test_sandbox_off_lets_the_same_call_through(seccomp_host, tmp_path):
    """The control: the hook's call is allowed without filters (so the tests above can fail)."""
    proc = boot("--serial", "null", "--sandbox", "off", "--timeout", "2", selftest="vcpu:execve")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 124, err.decode()       # no filter: no hook either, the guest ran
    machine = Machine(kernel=COUNTER, memory="64M", sandbox="off")
    assert machine.confinement.policy is None
    machine.close()


def test_exec_migration_still_works_and_spawn_deny_refuses_it(seccomp_host, tmp_path):
    """The monitor and migration threads may run exec: URIs (QEMU's spawn=allow); with
    spawn=deny the migration fails with one line and the guest runs on."""
    for spec, ok in (("on", True), ("on,spawn=deny", False)):
        sock, snap = tmp_path / f"q{ok}.sock", tmp_path / f"vm{ok}.snap"
        proc = boot("--serial", "null", "--sandbox", spec, "--qmp", f"unix:{sock},server=on,wait=off",
                    "--timeout", "30")
        try:
            assert qmp(sock, {"execute": "migrate", "arguments": {"uri": f"exec:cat > {snap}"}})[0] == {"return": {}}
            deadline = time.monotonic() + 20
            while True:
                status = qmp(sock, {"execute": "query-migrate"})[0]["return"].get("status")
                if status in ("completed", "failed") or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert status == ("completed" if ok else "failed")
            assert (snap.exists() and snap.stat().st_size > 4096) == ok
            assert qmp(sock, {"execute": "quit"})[0] == {"return": {}}
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err.decode()
        finally:
            proc.kill()
            proc.wait()


@pytest.fixture
def nobody_dir():
    """A directory the unprivileged user can write (the sockets live there, so it can remove them).
    Not root: kvmpy must refuse --runas with one line (and the test ends there)."""
    if os.geteuid() != 0:
        proc = boot("--runas", "nobody", "--serial", "null")
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 1 and b"kvmpy must start as root" in err
        pytest.xfail("not root: --runas refused as it should be; the confinement itself needs root")
    user = pwd.getpwnam("nobody")
    path = Path(tempfile.mkdtemp(prefix="kvmpy-runas-"))
    os.chmod(path, 0o755)
    os.chown(path, user.pw_uid, user.pw_gid)
    yield path, user
    shutil.rmtree(path, ignore_errors=True)


def proc_ids(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Uid"].split()[1]), int(fields["Gid"].split()[1])


def wait_until(predicate, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize("jail", ["runas", "chroot+runas"])
def test_runas_and_chroot_confine_a_running_guest(seccomp_host, nobody_dir, jail):
    path, user = nobody_dir
    sock, hvc, log = path / "q.sock", path / "hvc.sock", path / "serial.log"
    argv = ["--runas", "nobody", "--serial", f"file:{log}", "--virtio-console", f"unix:{hvc}",
            "--qmp", f"unix:{sock},server=on,wait=off", "--timeout", "30"]
    jail_dir = path / "jail"
    if "chroot" in jail:
        jail_dir.mkdir()
        argv += ["--chroot", str(jail_dir)]
    proc = boot(*argv)
    try:
        wait_until(lambda: proc_ids(proc.pid) == (user.pw_uid, user.pw_gid))
        if "chroot" in jail:
            assert os.readlink(f"/proc/{proc.pid}/root") == str(jail_dir)
        # the jail is entered while the machine is still in prelaunch: running follows
        wait_until(lambda: qmp(sock, {"execute": "query-status"})[0]["return"]["status"] == "running")
        wait_until(lambda: log.exists() and log.read_text().count("tick") > 2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert not sock.exists() and not hvc.exists()      # handed to nobody, removed at the end


def test_runas_refuses_an_unknown_user_with_one_line(kvm_available, tmp_path):
    log = tmp_path / "serial.log"
    proc = boot("--runas", "no-such-user-kvmpy", "--serial", f"file:{log}")
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert err.decode().strip().splitlines() == [
        "kvmpy: error: checking --runas: there is no user 'no-such-user-kvmpy' on this host"], err
    assert not log.exists()


def test_a_guest_reboot_under_runas_ends_kvmpy(seccomp_host, nobody_dir):
    path, _ = nobody_dir
    sock = path / "q.sock"
    proc = boot("--runas", "nobody", "--serial", "null", "--qmp", f"unix:{sock},server=on,wait=off",
                "--timeout", "30")
    try:
        assert qmp(sock, {"execute": "system_reset"})[0] == {"return": {}}
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err.decode()
