"""The /init scripts baked into the two initramfs kinds (busybox sh).

GUEST_INIT runs inside tier-2 test guests (L2): it loads the chosen modules, runs a test script
and prints markers a test can wait for. L1_INIT turns the TCG-booted L1 into a hardware-KVM
host: 9p host root + tmpfs overlay + chroot, then the harness's command.
"""
from __future__ import annotations

from pathlib import Path

from kvmpy.nested import keypin, watch

INIT_START_MARKER = "KVMPY-INIT-START"
TEST_RC_MARKER = "KVMPY-TEST-RC="
L1_READY_MARKER = "KVMPY-L1-READY"
L1_RC_MARKER = "KVMPY-L1-RC="
L1_FAIL_MARKER = "KVMPY-L1-SETUP-FAILED"
L1_KEYPIN_MARKER = "KVMPY-L1-KEYPIN"
L1_VMSTAT_MARKER = "KVMPY-L1-VMSTAT"      # page migrations and THP work: none expected (see L1_INIT)
KEYPIN_EOF = "KVMPY_KEYPIN_EOF"


def _keypin_source() -> str:
    """keypin.py's text, for L1's init to write into the chroot and run (a heredoc)."""
    source = Path(keypin.__file__).read_text()
    if KEYPIN_EOF in source or not source.endswith("\n"):
        raise AssertionError("keypin.py cannot be embedded in a heredoc as it is")
    return source

GUEST_INIT = r"""#!/bin/busybox sh
# kvmpy tier-2 guest init. Kernel command line options it reads:
#   kvmpy.test=<base64 shell script>   script to run (else /test.sh in the image)
#   kvmpy.testdisk=<dev>                mount <dev> (ext4) at /mnt and run /mnt/test.sh
#   kvmpy.exit=reboot|poweroff|shell    what to do afterwards (default reboot)
# The script runs under sh -e -o pipefail; KVMPY-TEST-RC= is its status (126: a module failed).
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin /run
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
echo "@INIT_START@ uptime=$(cut -d' ' -f1 /proc/uptime)"
modfail=""
for m in $(cat /etc/kvmpy-modules); do
  insmod "/lib/modules/$m" || { echo "KVMPY-MODULE-FAILED=$m"; modfail=1; }
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
# The script stops at its first failing step (-e, and -o pipefail for pipelines): its status
# is then that step's, so a test that checks KVMPY-TEST-RC=0 checks every step.
if [ -n "$script" ] && [ -f "$script" ]; then
  sh -e -o pipefail "$script"; rc=$?
else
  echo "KVMPY-NO-TEST-SCRIPT"; rc=0
  [ -n "$test_b64$test_disk" ] && rc=127
fi
# a module that did not load fails the run even when the script did not notice
[ -n "$modfail" ] && [ "$rc" = 0 ] && rc=126
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
# vhost_net without zero-copy transmit: a guest's tx pages then never outlive its send as skb
# frags (to a TAP on a bridge they are copied anyway). Tier 2's bridged pair (one guest on
# vhost-net) is the test L1 panicked under, "corrupted stack end" in a kvmpy vCPU thread: a
# hypothesis, not a proven cause (see tier2driver.MAX_WEDGES_PER_TEST).
# Words `module.param=value` on L1's command line reach that module, as modprobe passes them
# (KVMPY_L1_APPEND='kvm_amd.vgif=0' for an experiment).
for m in $(cat /etc/kvmpy-modules); do
  name=$(basename "$m"); name=${name%%.ko*}; name=$(echo "$name" | tr - _)
  params=""
  case "$name" in vhost_net) params="experimental_zcopytx=0" ;; esac
  for arg in $(cat /proc/cmdline); do
    case "$arg" in "$name".*=*) params="$params ${arg#$name.}" ;; esac
  done
  insmod "/lib/modules/$m" $params || echo "KVMPY-MODULE-FAILED=$m"
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
# No page migration under running guests. L1 (nested SVM under QEMU TCG) breaks when it moves
# memory its guests map: with compaction forced every second beside tier-2 guests it wedged
# (a TLB-shootdown IPI never answered), or panicked (a vCPU thread's #GP on gs:0x28 recursing
# into its stack guard) within about two minutes: the signatures
# of the wedges and panics seen in whole tier-2 runs. So: no compaction (proactive, for high-order
# allocations, of mlocked pages), no khugepaged collapse; huge pages only where a fault finds a
# free one (kvmpy asks for them with MADV_HUGEPAGE).
T=/sys/kernel/mm/transparent_hugepage
echo madvise > $T/enabled; echo never > $T/defrag; echo 0 > $T/khugepaged/defrag
echo 86400000 > $T/khugepaged/scan_sleep_millisecs
echo 86400000 > $T/khugepaged/alloc_sleep_millisecs
echo 0 > /proc/sys/vm/compaction_proactiveness
echo 1000 > /proc/sys/vm/extfrag_threshold
echo 0 > /proc/sys/vm/compact_unevictable_allowed
vmstat_line() {
  echo "@VMSTAT@ $(grep -E '^(pgmigrate_success|compact_stall|compact_success|thp_fault_alloc|thp_collapse_alloc|thp_split_page) ' /proc/vmstat | tr '\n' ' ')"
}
vmstat_line
# KVM's runtime static keys held on for L1's life, before any test's VM (kvmpy/nested/keypin.py
# says why: each flip rewrites __schedule's text, and that has wedged L1 under TCG)
cat > $R/run/kvmpy-keypin.py <<'@KEYPIN_EOF@'
@KEYPIN_SOURCE@@KEYPIN_EOF@
chroot $R /bin/sh -c 'exec python3 -I /run/kvmpy-keypin.py /run/kvmpy-keypin.held' </dev/null &
n=0
while [ ! -e $R/run/kvmpy-keypin.held ] && [ $n -lt 300 ]; do sleep 0.1; n=$((n+1)); done
if [ -e $R/run/kvmpy-keypin.held ]; then
  echo "@KEYPIN@ $(tr '\n' ';' < $R/run/kvmpy-keypin.held)"
else
  echo "@KEYPIN@ failed: no answer in 30 s"
fi
# For the host's watch (kvmpy.nested.watch): module addresses to symbolize a wedged L1 with,
# and a heartbeat from outside the chroot that answers a diagnosis request while L1 lives.
S="$R$scratch"
cat /proc/modules > "$S/@MODULES@"
# nokaslr: the core kernel's symbols are the same every boot, so the first boot keeps them
ks="$R$cache/l1-kallsyms-nokaslr-$(uname -r).txt"
[ -s "$ks" ] || { grep ' [tT] ' /proc/kallsyms | grep -v '\[' > "$ks.$$" && mv "$ks.$$" "$ks"; }
ready_up=$(cut -d' ' -f1 /proc/uptime)
watch_l1() {
  while :; do
    cut -d' ' -f1 /proc/uptime > "$S/@HEARTBEAT@"
    if [ -e "$S/@DUMP_REQUEST@" ]; then
      rm -f "$S/@DUMP_REQUEST@"
      {
        echo "L1 uptime $(cut -d' ' -f1 /proc/uptime), load $(cat /proc/loadavg)"
        for t in /proc/[0-9]*/task/[0-9]*; do
          st=$(awk '/^State:/ {print $2; exit}' "$t/status" 2>/dev/null)
          pid=${t#/proc/}; pid=${pid%%/*}
          case "$st:$(cat /proc/$pid/comm 2>/dev/null)" in
            R:*|D:*|*:python*|*:kvmpy*|*:qemu*)
                 echo "-- task ${t#/proc/} state $st comm $(cat "$t/comm" 2>/dev/null)"
                 cat "$t/stack" 2>/dev/null ;;
          esac
        done
        echo w > /proc/sysrq-trigger; echo l > /proc/sysrq-trigger; sleep 2
        echo "-- dmesg since L1 was ready"
        dmesg | awk -v r="$ready_up" '{ s = $0; sub(/^\[ */, "", s); split(s, t, "]"); if (t[1] + 0 > r + 0) print }' | tail -n 300
      } > "$S/@DUMP@" 2>&1
      : > "$S/@DUMP_DONE@"
    fi
    sleep 5
  done
}
watch_l1 &
watcher=$!
echo "@READY@ uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$mode" = shell ]; then
  setsid cttyhack chroot $R /bin/sh -c ". $scratch/env.sh; exec /bin/sh $scratch/cmd.sh"
  rc=$?
else
  chroot $R /bin/sh -c ". $scratch/env.sh; exec /bin/sh $scratch/cmd.sh" </dev/null
  rc=$?
fi
kill $watcher 2>/dev/null
vmstat_line
echo "$rc" > "$R$scratch/rc"
sync
echo "@RC@$rc"
if [ "$rc" != 0 ]; then echo "KVMPY-L1-DMESG-TAIL"; dmesg | tail -n 60; fi
poweroff -f
sleep 5
""".replace("@FAIL@", L1_FAIL_MARKER).replace("@READY@", L1_READY_MARKER) \
   .replace("@RC@", L1_RC_MARKER).replace("@MODULES@", watch.MODULES_FILE) \
   .replace("@HEARTBEAT@", watch.HEARTBEAT_FILE).replace("@DUMP_REQUEST@", watch.DUMP_REQUEST_FILE) \
   .replace("@DUMP_DONE@", watch.DUMP_DONE_FILE).replace("@DUMP@", watch.DUMP_FILE) \
   .replace("@VMSTAT@", L1_VMSTAT_MARKER).replace("@KEYPIN@", L1_KEYPIN_MARKER).replace("@KEYPIN_EOF@", KEYPIN_EOF) \
   .replace("@KEYPIN_SOURCE@", _keypin_source())
