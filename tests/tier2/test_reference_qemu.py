"""Reference: the stock Debian bzImage boots as a KVM guest under QEMU with our initramfs.

Also the boot-time reference later kvmpy benchmarks compare with: process start to the init
marker for `-M pc -kernel` and `-M microvm`, printed and saved to
.cache/nested/reference-boot.json.
"""
from __future__ import annotations

import json
import time

import pytest

from kvmpy.nested import tier2
from kvmpy.nested.kernel import cache_root

GUEST_TIMEOUT_S = 150.0
PROBE_SCRIPT = """\
echo "KVMPY-PROBE cpus=$(grep -c ^processor /proc/cpuinfo) kernel=$(uname -r)"
ls /sys/bus/virtio/drivers
"""


def _record(machine: str, run: tier2.GuestRun) -> None:
    path = cache_root() / "reference-boot.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data[f"qemu-{machine}"] = {"init_s": run.init_s, "total_s": run.elapsed_s,
                               "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.mark.parametrize("machine", ["pc", "microvm"])
def test_stock_kernel_boots_under_qemu(machine, stock_bzimage, kernel_package, build_initramfs,
                                       run_guest, capsys):
    initrd = build_initramfs()
    append = f"{tier2.DEFAULT_GUEST_APPEND} {tier2.test_script_arg(PROBE_SCRIPT)}"
    argv = tier2.qemu_guest_argv(stock_bzimage, initrd, append, machine=machine)
    run = run_guest(argv, timeout_s=GUEST_TIMEOUT_S, name=f"qemu-{machine}")

    assert not run.timed_out, f"guest did not finish in {GUEST_TIMEOUT_S}s"
    assert run.init_s is not None, "init marker never appeared"
    assert f"KVMPY-PROBE cpus=1 kernel={kernel_package.release}" in run.output
    assert "KVMPY-MODULE-FAILED" not in run.output
    assert run.test_rc == 0
    assert run.exit_status == 0, "QEMU should exit cleanly when the guest reboots (-no-reboot)"
    _record(machine, run)
    with capsys.disabled():
        print(f"\nREFERENCE qemu -M {machine} -kernel bzImage: init marker after "
              f"{run.init_s:.1f}s, guest done after {run.elapsed_s:.1f}s")


def test_guest_runs_script_from_ext4_disk(stock_bzimage, build_initramfs, build_ext4, run_guest):
    disk = build_ext4({"test.sh": "echo KVMPY-DISK-OK $(cat /mnt/data.txt)\nexit 7\n",
                       "data.txt": "payload-42\n"}, size_mib=8, label="t2disk")
    append = f"{tier2.DEFAULT_GUEST_APPEND} kvmpy.testdisk=/dev/vda"
    argv = tier2.qemu_guest_argv(stock_bzimage, build_initramfs(), append, disk=disk)
    run = run_guest(argv, timeout_s=GUEST_TIMEOUT_S, name="qemu-pc-disk")

    assert not run.timed_out, f"guest did not finish in {GUEST_TIMEOUT_S}s"
    assert "KVMPY-DISK-OK payload-42" in run.output
    assert run.test_rc == 7
    assert run.exit_status == 0, "QEMU should exit cleanly when the guest reboots (-no-reboot)"
