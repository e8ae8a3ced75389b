"""The /init scripts baked into the two initramfs kinds (busybox sh).

GUEST_INIT runs inside tier-2 test guests (L2): it loads the chosen modules, runs a test script
and prints markers a test can wait for. L1_INIT turns the TCG-booted L1 into a hardware-KVM
host: 9p host root + tmpfs overlay + chroot, then the harness's command.
"""
from __future__ import annotations

INIT_START_MARKER = "KVMPY-INIT-START"
TEST_RC_MARKER = "KVMPY-TEST-RC="
L1_READY_MARKER = "KVMPY-L1-READY"
L1_RC_MARKER = "KVMPY-L1-RC="
L1_FAIL_MARKER = "KVMPY-L1-SETUP-FAILED"

GUEST_INIT = r"""#!/bin/busybox sh
# kvmpy tier-2 guest init. Kernel command line options it reads:
#   kvmpy.test=<base64 shell script>   script to run (else /test.sh in the image)
#   kvmpy.testdisk=<dev>                mount <dev> (ext4) at /mnt and run /mnt/test.sh
#   kvmpy.exit=reboot|poweroff|shell    what to do afterwards (default reboot)
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "@INIT_START@ uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/kvmpy-modules); do
  insmod "/lib/modules/$m" || echo "KVMPY-MODULE-FAILED=$m"
done
test_b64="" ; test_disk="" ; exit_action=reboot
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kvmpy.test=*) test_b64="${arg#kvmpy.test=}" ;;
    kvmpy.testdisk=*) test_disk="${arg#kvmpy.testdisk=}" ;;
    kvmpy.exit=*) exit_action="${arg#kvmpy.exit=}" ;;
  esac
done
script=""
if [ -n "$test_b64" ]; then
  echo "$test_b64" | base64 -d > /tmp/test.sh && script=/tmp/test.sh
elif [ -n "$test_disk" ]; then
  n=0
  while [ ! -b "$test_disk" ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n+1)); done
  mount -t ext4 "$test_disk" /mnt && script=/mnt/test.sh
elif [ -f /test.sh ]; then
  script=/test.sh
fi
if [ -n "$script" ] && [ -f "$script" ]; then
  sh "$script"; rc=$?
else
  echo "KVMPY-NO-TEST-SCRIPT"; rc=0
  [ -n "$test_b64$test_disk" ] && rc=127
fi
echo "@TEST_RC@$rc"
sync
case "$exit_action" in
  poweroff) poweroff -f ;;
  shell) exec setsid cttyhack sh ;;
  *) reboot -f ;;
esac
sleep 5
""".replace("@INIT_START@", INIT_START_MARKER).replace("@TEST_RC@", TEST_RC_MARKER)

L1_INIT = r"""#!/bin/busybox sh
# kvmpy L1 init: a hardware-KVM host made of the host's own root, shared read-only over 9p.
# Command line: kvmpy.scratch=<path> kvmpy.cache=<path> kvmpy.mode=run|shell
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /lower /rw /newroot
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() { echo "@FAIL@ $*"; poweroff -f; sleep 5; }
echo "KVMPY-L1-INIT uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in $(cat /etc/kvmpy-modules); do
  insmod "/lib/modules/$m" || echo "KVMPY-MODULE-FAILED=$m"
done
scratch="" ; cache="" ; mode=run
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    kvmpy.scratch=*) scratch="${arg#kvmpy.scratch=}" ;;
    kvmpy.cache=*) cache="${arg#kvmpy.cache=}" ;;
    kvmpy.mode=*) mode="${arg#kvmpy.mode=}" ;;
  esac
done
ip link set lo up
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts,cache=loose,ro hostroot /lower || fail "mount host root"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "mount overlay tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
  || fail "mount overlay root"
R=/newroot
mount -t proc proc $R/proc && mount -t sysfs sysfs $R/sys && mount -t devtmpfs devtmpfs $R/dev \
  || fail "mount proc/sys/dev"
mkdir -p $R/dev/pts $R/dev/shm $R/run $R/tmp
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
# /tmp stays the overlay's (writable, in RAM): a tmpfs there would hide a checkout under /tmp.
mount -t tmpfs tmpfs $R/dev/shm && mount -t tmpfs tmpfs $R/run || fail "mount tmpfs"
mkdir -p "$R$scratch" "$R$cache"
mount -t 9p -o $opts scratch "$R$scratch" || fail "mount scratch share"
mount -t 9p -o $opts cache "$R$cache" || fail "mount cache share"
[ -c $R/dev/kvm ] || fail "no /dev/kvm in L1 (kvm_amd did not load)"
echo "@READY@ uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$mode" = shell ]; then
  setsid cttyhack chroot $R /bin/sh -c ". $scratch/env.sh; exec /bin/sh $scratch/cmd.sh"
  rc=$?
else
  chroot $R /bin/sh -c ". $scratch/env.sh; exec /bin/sh $scratch/cmd.sh" </dev/null
  rc=$?
fi
echo "$rc" > "$R$scratch/rc"
sync
echo "@RC@$rc"
if [ "$rc" != 0 ]; then echo "KVMPY-L1-DMESG-TAIL"; dmesg | tail -n 60; fi
poweroff -f
sleep 5
""".replace("@FAIL@", L1_FAIL_MARKER).replace("@READY@", L1_READY_MARKER) \
   .replace("@RC@", L1_RC_MARKER)
