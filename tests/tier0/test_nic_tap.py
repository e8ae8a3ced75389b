"""The TAP backend: ioctl numbers against <linux/if_tun.h>, offload flag mapping, and (as root, in
a private network namespace made with `unshare -n`, so the host's interfaces are never touched)
creation, errors, removal at close, and frames between virtio-net and the TAP both ways."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from kvmpy.vhost import tap as tapmod
from kvmpy.vhost.tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO_ECN,
                             tun_offload_flags)


def test_ioctl_numbers_match_the_header(tmp_path):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    names = ["TUNSETIFF", "TUNSETOFFLOAD", "TUNGETIFF", "TUNSETVNETHDRSZ", "TUNGETSNDBUF", "TUNSETSNDBUF",
             "IFF_TAP", "IFF_NO_PI", "IFF_VNET_HDR", "IFF_MULTI_QUEUE", "TUN_F_CSUM", "TUN_F_TSO4", "TUN_F_TSO6", "TUN_F_TSO_ECN",
             "TUN_F_UFO"]
    body = "\n".join(f'printf("\\"{n}\\": %lu,\\n", (unsigned long)({n}));' for n in names)
    (tmp_path / "t.c").write_text("#include <stdio.h>\n#include <sys/ioctl.h>\n#include <linux/if_tun.h>\nint main(void){printf(\"{\");\n"
                                  + body + '\nprintf("\\"end\\": 0}");return 0;}\n')
    subprocess.run(["gcc", "-o", str(tmp_path / "t"), str(tmp_path / "t.c")], check=True)
    c = json.loads(subprocess.run([str(tmp_path / "t")], check=True, capture_output=True, text=True).stdout)
    assert {n: getattr(tapmod, n) for n in names} == {n: c[n] for n in names}


def test_offload_flags_follow_guest_features():
    csum, tso4, tso6, ecn, ufo = 1 << 1, 1 << 7, 1 << 8, 1 << 9, 1 << 10
    assert tun_offload_flags(0) == 0
    assert tun_offload_flags(tso4 | tso6) == 0           # segmentation needs checksum offload
    assert tun_offload_flags(csum) == TUN_F_CSUM
    assert tun_offload_flags(csum | tso4 | ecn) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN
    assert tun_offload_flags(csum | ecn) == TUN_F_CSUM
    assert tun_offload_flags(csum | tso4 | tso6 | ecn | ufo) == 0x1F


NETNS_SCRIPT = textwrap.dedent(r'''
    import os, socket, struct, subprocess
    from support.mock_driver import BumpAllocator, MockPciDriver
    from kvmpy.devices.virtio.net import HDR_LEN, VirtioNet
    from kvmpy.devices.virtio.transport import VirtioPciDevice
    from kvmpy.errors import DeviceError
    from kvmpy.memslots import GuestMemory
    from kvmpy.vhost.tap import Tap

    def links():
        return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout

    out = {}
    # an existing TAP, down, no bridge: attached and brought up without importing pyroute2 (only a
    # bridge needs it), and left behind at close
    import sys
    subprocess.run(["ip", "tuntap", "add", "kvtap2", "mode", "tap", "vnet_hdr"], check=True)
    e = Tap("kvtap2")
    out["existing"] = (not e.created, "UP" in subprocess.run(["ip", "-o", "link", "show", "kvtap2"],
                       capture_output=True, text=True).stdout.split(">")[0], "pyroute2" not in sys.modules)
    e.close()
    out["existing_left"] = "kvtap2" in links()
    t = Tap("")
    out["name"] = t.ifname
    out["up"] = "UP" in subprocess.run(["ip", "-o", "link", "show", t.ifname], capture_output=True, text=True).stdout
    out["created_without_pyroute2"] = t.created and "pyroute2" not in sys.modules    # only a bridge needs it
    import fcntl
    from kvmpy.vhost.tap import TUNGETSNDBUF
    out["sndbuf"] = struct.unpack("i", fcntl.ioctl(t.fds[0], TUNGETSNDBUF, bytes(4)))[0]   # QEMU's: unlimited
    errors = []
    for kw in (dict(ifname=t.ifname), dict(bridge="nosuch"), dict(bridge="lo")):
        try:
            Tap(**kw)
        except DeviceError as e:
            errors.append(str(e))
    out["errors"] = errors
    subprocess.run(["ip", "link", "add", "kvbr0", "type", "bridge"], check=True)
    b = Tap("kvtap1", bridge="kvbr0")
    out["on_bridge"] = "kvtap1" in subprocess.run(["ip", "-o", "link", "show", "master", "kvbr0"],
                                                  capture_output=True, text=True).stdout
    b.close()
    out["removed"] = "kvtap1" not in links()

    # frames both ways: the device's tx appears on the interface, a frame sent there reaches rx
    mem = GuestMemory.create(1 << 20)
    mac = bytes.fromhex("525400123456")
    net = VirtioNet(t, mac)
    dev = VirtioPciDevice(net, mem)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000))
    rx, tx, ctrl = drv.start(3)
    sniff = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    sniff.bind((t.ifname, 0))
    sniff.settimeout(2)
    frame = b"\xff" * 6 + mac + b"\x88\xb5" + b"kvmpy-tx" + bytes(50)
    mem.write(0x70000, bytes(HDR_LEN) + frame)
    tx.add([(0x70000, HDR_LEN + len(frame), False)])
    drv.notify(1)
    while True:
        got = sniff.recv(4096)
        if b"kvmpy-tx" in got:
            break
    out["tx_seen"] = got == frame
    inject = mac + b"\x02" * 6 + b"\x88\xb5" + b"kvmpy-rx" + bytes(50)
    bufs = {rx.add([(0x71000 + 0x1000 * i, 4096, True)]): 0x71000 + 0x1000 * i for i in range(8)}
    sniff.send(inject)
    import select, time
    seen = []
    deadline = time.monotonic() + 5
    while inject not in seen and time.monotonic() < deadline:   # the kernel may send IPv6 noise too
        select.select([t.fds[0]], [], [], 0.5)
        net.on_tap_readable(0)
        seen += [mem.read(bufs[h] + HDR_LEN, n - HDR_LEN) for h, n in rx.used()]
    out["rx"] = inject in seen
    t.close()
    out["gone"] = out["name"] not in links()
    print("RESULT", __import__("json").dumps(out))
''')


def test_tap_in_a_private_netns():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root (CAP_NET_ADMIN) and unshare(1) for a private network namespace")
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", NETNS_SCRIPT], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
                       env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(__file__))})  # tests/: support
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert out["name"].startswith("tap") and out["up"] and out["created_without_pyroute2"]
    assert out["sndbuf"] == 2**31 - 1
    e = out["errors"]
    assert "in use by another process" in e[0] and "no such interface" in e[1] and "not a bridge" in e[2]
    assert out["on_bridge"] and out["removed"] and out["tx_seen"] and out["rx"] and out["gone"]
    assert out["existing"] == [True, True, True] and out["existing_left"]
