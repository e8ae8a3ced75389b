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
from dataclasses import dataclass

import pytest

from kvmpy.nested import tier2

APPEND = "console=ttyS0 panic=-1 quiet"
TIMEOUT_S = 300.0
PAYLOAD = bytes((i * 7 + 3) % 251 for i in range(256 * 1024))
NEW_FILE = "KVMPY-NEW-FILE written by the guest\n"

# Runs under sh -e -o pipefail (GUEST_INIT): the first failing step ends it with its status.
# /proc/interrupts is read before and after the I/O (KVMPY-IRQ1/2) so the host can see counts
# rise; KVMPY-VDEV maps virtioN to its driver. (At most ~740 bytes: it rides the command line.)
GUEST_SCRIPT = """\
s(){ grep -i virtio /proc/interrupts|sed "s/^/KVMPY-IRQ$1 /";}
s 1
mount -t ext4 /dev/vda /mnt
echo "KVMPY-SHA $(sha256sum /mnt/payload.bin|cut -d' ' -f1)"
echo KVMPY-NEW-FILE written by the guest >/mnt/new.txt
sync
umount /mnt
echo "KVMPY-RO $(cat /sys/block/vdb/ro) SERIAL $(cat /sys/block/vdb/serial)"
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/dev/null&&echo KVMPY-RO-WRITE-OK
echo "KVMPY-HWRNG $(head -c 4096 /dev/hwrng|wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
r(){ echo "KVMPY-RNG $(head -c 256 /dev/hwrng|od -An -tx1 -v|tr -d ' \\n')";}
r
r
echo KVMPY-HVC-HELLO >/dev/hvc0
for d in /sys/bus/virtio/devices/*;do echo "KVMPY-VDEV ${d##*/} $(basename $(readlink $d/driver))";done
s 2
echo KVMPY-SCRIPT-DONE
"""


@dataclass(frozen=True)
class IrqLine:
    """One /proc/interrupts line: its number, summed count over CPUs, chip and the rest."""
    irq: str
    count: int
    desc: str


def interrupt_lines(output: str, marker: str) -> dict[str, IrqLine]:
    lines = {}
    for line in output.splitlines():
        if not line.startswith(marker + " "):
            continue
        tokens = line[len(marker) + 1:].split()
        counts = []
        for token in tokens[1:]:
            if not token.isdigit():
                break
            counts.append(int(token))
        irq = tokens[0].rstrip(":")
        lines[irq] = IrqLine(irq, sum(counts), " ".join(tokens[1 + len(counts):]))
    return lines


def rising(output: str) -> list[IrqLine]:
    """The virtio interrupt lines whose counts rose between the script's two reads."""
    before, after = interrupt_lines(output, "KVMPY-IRQ1"), interrupt_lines(output, "KVMPY-IRQ2")
    assert after, "no virtio interrupts listed in /proc/interrupts"
    return [line for irq, line in after.items() if line.count > before.get(irq, IrqLine(irq, 0, "")).count]


def device_names(output: str) -> dict[str, str]:
    """virtioN -> its driver (virtio_blk, virtio_rng, virtio_console)."""
    return dict(line.split()[1:3] for line in output.splitlines() if line.startswith("KVMPY-VDEV ")
                and len(line.split()) == 3)


def rng_samples(output: str) -> list[bytes]:
    return [bytes.fromhex(line.split()[1]) for line in output.splitlines()
            if line.startswith("KVMPY-RNG ") and len(line.split()) == 2]


def test_the_host_side_parsers():
    out = ("KVMPY-IRQ1  24:          3   PCI-MSIX-0000:00:03.0   1-edge      virtio0-req.0\n"
           "KVMPY-IRQ2  24:         40   PCI-MSIX-0000:00:03.0   1-edge      virtio0-req.0\n"
           "KVMPY-IRQ2  25:          0   PCI-MSIX-0000:00:04.0   0-edge      virtio1-config\n"
           "KVMPY-VDEV virtio0 virtio_blk\nKVMPY-RNG 00ff10\n")
    assert [line.irq for line in rising(out)] == ["24"] and "virtio0-req.0" in rising(out)[0].desc
    assert device_names(out) == {"virtio0": "virtio_blk"} and rng_samples(out) == [bytes([0, 255, 16])]


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
    assert run.test_rc == 0 and "KVMPY-SCRIPT-DONE" in out, f"guest script failed (status {run.test_rc})"
    assert f"KVMPY-SHA {hashlib.sha256(PAYLOAD).hexdigest()}" in out
    assert debugfs_cat(disk, "/new.txt") == NEW_FILE.encode(), "the guest's file is not in the image"
    assert "KVMPY-RO 1 SERIAL KVMPYRO42" in out
    assert "KVMPY-RO-WRITE-OK" not in out and ro_disk.read_bytes() == b"\xa5" * (1 << 20)
    assert "KVMPY-HWRNG 4096 virtio_rng" in out
    first, second = rng_samples(out)  # random bytes: not zeros, not a pattern, not the same twice
    assert len(first) == len(second) == 256 and first != second
    assert len(set(first)) > 100 and len(set(second)) > 100, (first.hex(), second.hex())
    assert first[:128] != first[128:] and first[:128] not in second
    assert hvc_out.read_bytes().count(b"KVMPY-HVC-HELLO") == 1
    devices = device_names(out)
    blk = [name for name, driver in devices.items() if driver == "virtio_blk"]
    assert len(blk) == 2 and "virtio_rng" in devices.values(), devices
    rose = rising(out)
    listed = interrupt_lines(out, "KVMPY-IRQ2").values()
    # the disk I/O and the rng reads happened between the two reads of /proc/interrupts
    if interrupts == "msix":
        assert all("MSI" in line.desc for line in listed), listed
        assert any(line.desc.endswith("-req.0") and line.desc.split()[-1].split("-")[0] in blk
                   for line in rose), ("no virtio-blk MSI-X vector fired", rose)
        rng = next(name for name, driver in devices.items() if driver == "virtio_rng")
        assert any(line.desc.split()[-1] == f"{rng}-input" for line in rose), ("no virtio-rng MSI-X vector fired", rose)
    else:
        assert all("MSI" not in line.desc for line in listed), listed
        assert any("IO-APIC" in line.desc for line in rose), ("no virtio INTx interrupt fired", rose)
    assert run.exit_status == 0
