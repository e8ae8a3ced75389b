"""Tier 1: the static-key pin L1's init runs (kvmpy/nested/keypin.py) holds every key on this
host's /dev/kvm, reports it in its file, and outlives the signals a test run may send."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from kvmpy.nested import keypin


def test_hold_keys_holds_all_four(kvm_available):
    fds, held, failures = keypin.hold_keys()
    try:
        assert failures == []
        assert held == list(keypin.KEYS)
        # /dev/kvm, two VMs, a vCPU in each
        kinds = sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in fds)
        assert kinds.count("anon_inode:kvm-vm") == 2
        assert sum(k.startswith("anon_inode:kvm-vcpu") for k in kinds) == 2
    finally:
        for fd in fds:
            os.close(fd)


def test_the_script_reports_and_stays(kvm_available, tmp_path: Path):
    held_file = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-I", keypin.__file__, str(held_file)],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not held_file.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert held_file.read_text() == "held " + " ".join(keypin.KEYS) + "\n"
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            proc.send_signal(sig)
        time.sleep(0.3)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait(timeout=10)
