"""Tier 2: the stock Debian guest on kvmpy's ACPI tables and PM block.

Guest scripts run under sh -e -o pipefail and end with KVMPY-SCRIPT-DONE: a failing step shows.
`poweroff -f` goes through ACPI S5 (PM1a_CNT SLP_TYP|SLP_EN) and must end kvmpy with status 0
("guest powered off") instead of leaving halted vCPUs behind; `reboot -f` takes Linux's default
ACPI reset-register path and, under --no-reboot, also ends with 0. The guest's dmesg must show
the tables found (RSDP in the BIOS area, FADT, DSDT, MADT) and the MADT's CPUs online.
"""
from __future__ import annotations

import re
import sys

from kvmpy.nested import tier2

APPEND = "console=ttyS0 panic=-1 quiet"
TIMEOUT_S = 240.0

DMESG_SCRIPT = """\
dmesg | grep -E 'ACPI|RSDP|PCI Interrupt Link|PM-Timer|clocksource' | sed 's/^/KVMPY-DMESG /'
echo "KVMPY-CPUS $(cat /sys/devices/system/cpu/online)"
echo "KVMPY-PCI0 $(cat /sys/bus/acpi/devices/PNP0A03:00/path 2>/dev/null)"
echo KVMPY-SCRIPT-DONE
"""


def kvmpy_argv(bzimage, initrd, script: str, *extra: str, append: str = APPEND) -> list[str]:
    return [sys.executable, "-m", "kvmpy", "--log-level", "info", "boot", "--kernel", str(bzimage),
            "--initrd", str(initrd), "--append", f"{append} {tier2.test_script_arg(script)}",
            "--serial", "stdio", "--no-reboot", "-m", "512M", *extra]


def dmesg(output: str) -> list[str]:
    return [line.split("KVMPY-DMESG ", 1)[1] for line in output.splitlines() if "KVMPY-DMESG " in line]


def test_poweroff_ends_kvmpy_and_dmesg_shows_the_tables(stock_bzimage, build_initramfs, run_guest):
    run = run_guest(kvmpy_argv(stock_bzimage, build_initramfs(), DMESG_SCRIPT, "--smp", "2",
                               append=APPEND + " kvmpy.exit=poweroff"), TIMEOUT_S, "kvmpy-acpi-poweroff")
    log = dmesg(run.output)
    assert run.test_rc == 0 and "KVMPY-SCRIPT-DONE" in run.output, f"guest script failed (status {run.test_rc})"
    assert "RSDP was not found" not in run.output
    assert any(re.search(r"ACPI: RSDP 0x00000000000E0000 000024 \(v02 KVMPY", line) for line in log), log
    for sig in ("XSDT", "FACP", "DSDT", "FACS", "APIC"):
        assert any(f"ACPI: {sig} 0x" in line for line in log), (sig, log)
    assert not [line for line in log if "ACPI BIOS Error" in line or "ACPI Error" in line], log
    assert any("ACPI: PM: (supports S0 S5)" in line for line in log), log
    assert "KVMPY-CPUS 0-1" in run.output
    assert "KVMPY-PCI0 \\_SB_.PCI0" in run.output
    assert "guest entered ACPI S5" in run.output
    assert run.exit_status == 0 and "guest ended: guest powered off" in run.output, run.tail(20)


def test_reboot_uses_the_acpi_reset_register(stock_bzimage, build_initramfs, run_guest):
    run = run_guest(kvmpy_argv(stock_bzimage, build_initramfs(), "echo KVMPY-REBOOTING\nreboot -f\n"),
                    TIMEOUT_S, "kvmpy-acpi-reboot")
    assert "KVMPY-REBOOTING" in run.output
    assert "guest wrote the ACPI reset register" in run.output
    assert run.exit_status == 0 and "guest ended: guest rebooted (--no-reboot)" in run.output


def test_no_acpi_falls_back_to_the_mp_table(stock_bzimage, build_initramfs, run_guest):
    run = run_guest(kvmpy_argv(stock_bzimage, build_initramfs(), DMESG_SCRIPT + "reboot -f\n", "--no-acpi",
                               "--smp", "2"), TIMEOUT_S, "kvmpy-no-acpi")
    assert "KVMPY-SCRIPT-DONE" in run.output, "the guest script stopped at a failing step"
    assert "KVMPY-CPUS 0-1" in run.output, "the MP table must still bring up both CPUs"
    assert not any("ACPI: FACP" in line for line in dmesg(run.output))
    assert run.exit_status == 0
