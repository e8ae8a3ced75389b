"""Tier 2: the QMP monitor with the stock Linux guest (issue 10), written with kvmpy's own pytest
plugin (`kvm_machine`): stop/cont around a ticking console, system_reset reboots it, a snapshot
through `migrate file:` restored by `kvmpy boot --incoming defer` + `migrate-incoming`, and
system_powerdown shutting the guest down through ACPI's fixed power button."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from kvmpy.monitor.client import QmpClient
from kvmpy.nested import tier2

APPEND = "console=ttyS0 panic=-1 quiet kvmpy.exit=poweroff"
# The guest powers itself off when its ACPI power button is pressed (what acpid/systemd do), and
# ticks meanwhile. The button is the kernel's fixed-feature "Power Button" input device.
GUEST_SCRIPT = """\
dev=$(grep -A4 'Name="Power Button"' /proc/bus/input/devices | grep -o 'event[0-9]*' | head -n1)
echo "KVMPY-BUTTON $dev"
( dd if=/dev/input/$dev of=/dev/null bs=24 count=1 2>/dev/null; echo KVMPY-POWER-BUTTON; poweroff -f ) &
i=0
while true; do echo "KVMPY-TICK $i"; i=$((i+1)); sleep 0.3; done
"""
MODULES = ("virtio_pci", "virtio_blk", "virtio_rng", "ext4", "crc32c_generic", "button", "evdev")
TICK = re.compile(r"KVMPY-TICK (\d+)\r?\n")


@pytest.fixture
def guest(stock_bzimage, build_initramfs) -> dict:
    return {"kernel": str(stock_bzimage), "initrd": str(build_initramfs(modules=MODULES)),
            "append": f"{APPEND} {tier2.test_script_arg(GUEST_SCRIPT)}", "memory": "512M", "timeout": 240}


def test_stop_cont_reset_migrate_and_powerdown(kvm_machine, guest, tmp_path):
    vm = kvm_machine(qmp=True, **guest)
    vm.console.expect(r"KVMPY-BUTTON event\d+", timeout=120)
    vm.console.expect(TICK, timeout=60)
    q = vm.qmp
    q.execute("stop")
    assert q.execute("query-status")["status"] == "paused"
    before = len(TICK.findall(vm.console.text))
    time.sleep(1.5)
    assert len(TICK.findall(vm.console.text)) == before, "the guest ticked while stopped"
    q.execute("cont")
    vm.console.expect(TICK, timeout=30)
    assert q.execute("query-status")["status"] == "running"

    q.execute("system_reset")
    assert q.wait_event("RESET", 30)["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    vm.console.expect(r"KVMPY-INIT-START", timeout=120)       # booted again
    vm.console.expect(r"KVMPY-TICK 2\r?\n", timeout=120)

    snap = tmp_path / "vm.snap"
    q.execute("migrate", {"uri": f"file:{snap}"})
    deadline = time.monotonic() + 120
    while (info := q.execute("query-migrate")).get("status") != "completed":
        assert info.get("status") != "failed" and time.monotonic() < deadline, info
        time.sleep(0.2)
    source_text = vm.console.text
    source_text = source_text[source_text.rfind("KVMPY-INIT-START"):]     # the boot after the reset
    q.execute("quit")
    assert q.wait_event("SHUTDOWN", 30)["data"] == {"guest": False, "reason": "host-qmp-quit"}

    # A new process waits with --incoming defer until QMP hands it the stream.
    sock = tmp_path / "dest.qmp"
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "boot", "--incoming", "defer", "--kernel", guest["kernel"],
                             "--initrd", guest["initrd"], "--append", guest["append"], "-m", "512M",
                             "--serial", "stdio", "--timeout", "200", "--qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no monitor socket"
            time.sleep(0.1)
        with QmpClient(str(sock), timeout=30) as dq:
            assert dq.execute("query-status")["status"] == "inmigrate"
            dq.execute("migrate-incoming", {"uri": f"file:{snap}"})
            deadline = time.monotonic() + 120
            while dq.execute("query-status")["status"] != "running":
                assert time.monotonic() < deadline, dq.execute("query-migrate")
                time.sleep(0.2)
            time.sleep(1.0)                                     # a few more ticks
            dq.execute("system_powerdown")
            assert dq.wait_event("POWERDOWN", 10)["event"] == "POWERDOWN"
            shutdown = dq.wait_event("SHUTDOWN", 120)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert shutdown["data"] == {"guest": True, "reason": "guest-shutdown"}, text[-2000:]
    assert proc.returncode == 0, text[-2000:]
    ticks = [int(t) for t in TICK.findall(source_text + text)]   # a line cut by the save joins up
    assert len(ticks) > len(TICK.findall(source_text)) and ticks == list(range(len(ticks))), \
        f"the ticks across the snapshot have a gap or a repeat: {ticks}"
    assert "KVMPY-POWER-BUTTON" in text, "the guest did not see its power button"
