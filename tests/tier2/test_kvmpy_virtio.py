"""Tier 2: the stock Debian guest drives kvmpy's virtio-pci devices (issue 5).

virtio-blk: mount an ext4 image made on the host, check a file the host knows the digest of,
write a new file, sync; the host then reads it back from the image. virtio-rng: /dev/hwrng gives
bytes. virtio-console: hvc0 output reaches the host file. MSI-X is used by default; with
pci=nomsi the same I/O works over INTx through the IOAPIC.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys

import pytest

from kvmpy.nested import tier2

APPEND = "console=ttyS0 panic=-1 quiet"
TIMEOUT_S = 300.0
PAYLOAD = bytes((i * 7 + 3) % 251 for i in range(256 * 1024))
NEW_FILE = "KVMPY-NEW-FILE written by the guest\n"

GUEST_SCRIPT = """\
mount -t ext4 /dev/vda /mnt || { echo KVMPY-MOUNT-FAILED; exit 11; }
echo "KVMPY-SHA $(sha256sum /mnt/payload.bin | cut -d' ' -f1)"
printf 'KVMPY-NEW-FILE written by the guest\\n' > /mnt/new.txt
sync
umount /mnt
echo "KVMPY-RO $(cat /sys/block/vdb/ro) SERIAL $(cat /sys/block/vdb/serial)"
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null && echo KVMPY-RO-WRITE-OK
echo "KVMPY-HWRNG $(head -c 4096 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
echo KVMPY-HVC-HELLO > /dev/hvc0
grep -i virtio /proc/interrupts | sed 's/^/KVMPY-IRQ /'
"""


def kvmpy_argv(bzimage, initrd, disk, ro_disk, hvc_out, append: str) -> list[str]:
    return [sys.executable, "-m", "kvmpy", "boot", "--kernel", str(bzimage), "--initrd", str(initrd),
            "--append", f"{append} {tier2.test_script_arg(GUEST_SCRIPT)}", "--serial", "stdio",
            "--no-reboot", "-m", "512M", "--drive", f"file={disk}",
            "--drive", f"file={ro_disk},readonly=on,serial=KVMPYRO42", "--rng",
            "--virtio-console", f"file:{hvc_out}"]


def debugfs_cat(image, path: str) -> bytes:
    r = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True, timeout=60)
    return r.stdout


@pytest.mark.parametrize("interrupts", ["msix", "intx"])
def test_blk_rng_console_with_real_linux(interrupts, stock_bzimage, build_initramfs, build_ext4,
                                         run_guest, tmp_path):
    cached = build_ext4({"payload.bin": PAYLOAD}, size_mib=16, label="kvmpyblk")
    disk = tmp_path / "disk.ext4"
    shutil.copyfile(cached, disk)  # the guest writes: never into the shared cache
    ro_disk = tmp_path / "ro.img"
    ro_disk.write_bytes(b"\xa5" * (1 << 20))
    hvc_out = tmp_path / "hvc.out"
    append = APPEND + (" pci=nomsi" if interrupts == "intx" else "")
    run = run_guest(kvmpy_argv(stock_bzimage, build_initramfs(), disk, ro_disk, hvc_out, append),
                    TIMEOUT_S, f"kvmpy-virtio-{interrupts}")
    out = run.output
    assert run.test_rc == 0, "guest script failed"
    assert f"KVMPY-SHA {hashlib.sha256(PAYLOAD).hexdigest()}" in out
    assert debugfs_cat(disk, "/new.txt") == NEW_FILE.encode(), "the guest's file is not in the image"
    assert "KVMPY-RO 1 SERIAL KVMPYRO42" in out
    assert "KVMPY-RO-WRITE-OK" not in out and ro_disk.read_bytes() == b"\xa5" * (1 << 20)
    assert "KVMPY-HWRNG 4096 virtio_rng" in out
    assert hvc_out.read_bytes().count(b"KVMPY-HVC-HELLO") == 1
    irq_lines = [line for line in out.splitlines() if line.startswith("KVMPY-IRQ")]
    assert irq_lines, "no virtio interrupts listed in /proc/interrupts"
    if interrupts == "msix":
        assert any("PCI-MSIX" in line or "PCI-MSI" in line for line in irq_lines), irq_lines
    else:
        assert all("MSI" not in line for line in irq_lines) and any("IO-APIC" in line for line in irq_lines), irq_lines
    assert run.exit_status == 0
