"""Tier 2: static migration of a running stock Linux guest (issue 9).

The source is a Python process using the in-process API: it boots Debian's kernel with 2 vCPUs,
virtio-blk, virtio-rng and a virtio console, waits until a workload in the guest is under way (tests/tier2/workload.py: a counter on the console with the guest's uptime, a file growing
on the disk, random data on tmpfs), saves the machine,
and is SIGKILLed. A new `kvmpy boot --incoming URI` process with the same flags restores it: the
count goes on without a gap, the guest's clock never goes backwards, the file on the disk ends
complete, and the guest then reboots (through kvmpy's reset, a fresh boot of the same kernel) and
powers itself off.
"""
from __future__ import annotations

import shutil
import sys

import pytest

from kvmpy.nested import tier2
from workload import APPEND, GUEST_SCRIPT, MOVE_AT, check_moved_workload, device_flags

TIMEOUT_S = 300.0
# The source's line after the guest's console text, on a line of its own: the console may end in
# the middle of a count line (a CI run had "KVMPY-COUNT 13 " when the guest paused), which the
# restored guest finishes.
SAVED_MARK = "\nKVMPY-SAVED "

SOURCE = """\
import os, signal, sys
from kvmpy import Machine
kernel, initrd, append, disk, hvc, uri, save_at = sys.argv[1:8]
m = Machine(kernel=kernel, initrd=initrd, append=append, memory="512M", smp=2,
            drives=[f"file={disk}"], rng=True, console=f"file:{hvc}", timeout=250)
m.start()
m.console.expect(rf"KVMPY-COUNT {save_at} [0-9.]+\\r?\\n", timeout=240)
m.save(uri)
sys.stdout.write(m.console.text)   # may end in half a line: the destination sends the rest
print("\\nKVMPY-SAVED", m.status, m.last_migration["total-time"], "ms", flush=True)
os.kill(os.getpid(), signal.SIGKILL)   # the source dies: only the snapshot is left
"""


@pytest.mark.parametrize("transport", ["file", "exec"])
def test_running_linux_saved_killed_and_restored(transport, stock_bzimage, build_initramfs, build_ext4,
                                                 run_guest, tmp_path):
    disk = tmp_path / "disk.ext4"
    shutil.copyfile(build_ext4({"placeholder": b"x"}, size_mib=16, label="kvmpysnap"), disk)
    hvc, snap = tmp_path / "hvc.out", tmp_path / "vm.snap"
    initrd = build_initramfs()
    append = f"{APPEND} {tier2.test_script_arg(GUEST_SCRIPT)}"
    save_uri = f"file:{snap}" if transport == "file" else f"exec:cat > {snap}"
    source = run_guest([sys.executable, "-c", SOURCE, str(stock_bzimage), str(initrd), append, str(disk),
                        str(hvc), save_uri, str(MOVE_AT)], TIMEOUT_S, f"source-{transport}")
    console, saved, said = source.output.rpartition(SAVED_MARK)
    assert saved and said.startswith("postmigrate"), "the source did not save"
    assert not source.timed_out and source.exit_status is None, "the source should have died by SIGKILL"
    restore_uri = f"file:{snap}" if transport == "file" else f"exec:cat {snap}"
    dest = run_guest([sys.executable, "-m", "kvmpy", "boot", "--incoming", restore_uri, "--kernel", str(stock_bzimage),
                      "--initrd", str(initrd), "--append", append, "--serial", "stdio", *device_flags(disk, hvc)],
                     TIMEOUT_S, f"restored-{transport}")
    assert dest.test_rc == 0 and dest.exit_status == 0, f"rc={dest.test_rc} status={dest.exit_status}"
    check_moved_workload(console, dest.output, disk, hvc, "snapshot")
