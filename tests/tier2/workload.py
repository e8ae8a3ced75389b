"""The running workload both tier-2 migration tests move (a snapshot through a file or a pipe,
and live pre-copy): a count with the guest's uptime on the console, a file growing on the disk,
random data on tmpfs with its checksum, hvc output; then a reboot and a power-off. One script and
one set of checks, so "the guest's work survived" means the same thing for both."""
from __future__ import annotations

import re
import subprocess

COUNT = 40
MOVE_AT = 8          # the source saves / migrates once the count reaches this
# After the move the count slows to 1/s, so the move has ~30 s of guest time before the guest
# reboots: a pre-copy that outlives the count meets the reboot (the source's board is rebuilt
# and the migration ends). L1 under load once took longer than the old ~10 s window.
APPEND = "console=ttyS0 panic=-1 quiet kvmpy.exit=poweroff"

GUEST_SCRIPT = f"""\
set -e
mount -t ext4 /dev/vda /mnt
if [ -f /mnt/phase2 ]; then
  echo "KVMPY-SECOND-BOOT $(wc -l < /mnt/log.txt)"
  umount /mnt
  exit 0
fi
mount -t tmpfs -o size=32m tmpfs /tmp
dd if=/dev/urandom of=/tmp/random bs=65536 count=256 2>/dev/null
sum_before=$(md5sum < /tmp/random)
head -c 64 /dev/hwrng > /dev/null
i=0
while [ $i -lt {COUNT} ]; do
  echo "line $i" >> /mnt/log.txt
  echo "KVMPY-COUNT $i $(cut -d' ' -f1 /proc/uptime)"
  i=$((i+1))
  if [ $i -le {MOVE_AT + 2} ]; then sleep 0.3; else sleep 1; fi
done
[ "$(md5sum < /tmp/random)" = "$sum_before" ] && echo KVMPY-TMPFS-INTACT
echo KVMPY-HVC-AFTER > /dev/hvc0
touch /mnt/phase2
sync
umount /mnt
echo KVMPY-REBOOTING
reboot -f
"""


def device_flags(disk, hvc) -> list[str]:
    """The machine both ends are built with (a destination takes the source's flags, as QEMU's)."""
    return ["-m", "512M", "--smp", "2", "--drive", f"file={disk}", "--rng", "--virtio-console", f"file:{hvc}"]


def counts(text: str) -> list[tuple[int, float]]:
    """(count, guest uptime) for every KVMPY-COUNT line."""
    return [(int(n), float(t)) for n, t in re.findall(r"KVMPY-COUNT (\d+) ([0-9.]+)", text)]


def check_moved_workload(before: str, after: str, disk, hvc, what: str) -> None:
    """The source's console up to the move, the destination's after it: the count has no gap or
    repeat, the guest clock never went backwards, tmpfs and the disk file are intact, hvc output
    went on, and the guest rebooted and came back."""
    first = counts(before)
    assert first and first[-1][0] >= MOVE_AT, f"the source stopped before count {MOVE_AT}"
    # The serial stream goes on byte for byte across the move: a line the source had half sent
    # ("KVMPY-COUNT 17 2") ends on the destination ("2.51"), so the two are read as one text.
    both = counts(before + after)
    numbers = [n for n, _ in both]
    assert numbers == list(range(COUNT)), f"the count has a gap or a repeat across the {what}: {numbers}"
    uptimes = [t for _, t in both]
    assert uptimes == sorted(uptimes), f"the guest clock went backwards across the {what}: {uptimes}"
    assert "KVMPY-TMPFS-INTACT" in after, f"the random data on tmpfs changed across the {what}"
    assert "KVMPY-REBOOTING" in after and f"KVMPY-SECOND-BOOT {COUNT}" in after, f"no reboot after the {what}"
    log = subprocess.run(["debugfs", "-R", "cat /log.txt", str(disk)], capture_output=True, timeout=60).stdout
    assert log == "".join(f"line {i}\n" for i in range(COUNT)).encode(), "the file on the disk is not complete"
    assert hvc.read_bytes().count(b"KVMPY-HVC-AFTER") == 1
