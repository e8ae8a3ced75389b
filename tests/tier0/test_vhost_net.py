"""vhost-net without the kernel: the ioctl sequence VhostNetOffload issues (recorded by a fake
VhostNet), the indices it reads back, GPA->HVA translation, and the one-line errors of a missing
/dev/vhost-net (vhost=on fails, vhost=auto falls back; TAPs in a private netns)."""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.errors import DeviceError
from kvmpy.memslots import GuestMemory
from kvmpy.vhost import net as vhostnet
from kvmpy.vhost.net import VHOST_NET_F_VIRTIO_NET_HDR, VhostNet, VhostNetOffload, host_address
from support.fake_vhost import recording_vhost


FakeVhost = recording_vhost((1 << 32) | (1 << 15) | (1 << 29) | VHOST_NET_F_VIRTIO_NET_HDR,
                            vring_base=lambda q: 7 + q)


class FakePath:
    def __init__(self, mem):
        self.mem = mem
        self.taken, self.released = [], []

    def take_kick(self, q):
        self.taken.append(q)
        return 100 + q

    def release_kick(self, q):
        self.released.append(("kick", q))

    def call_eventfd(self, q):
        return 200 + q

    def release_call(self, q):
        self.released.append(("call", q))


@pytest.fixture
def mem():
    m = GuestMemory.create(1 << 20)
    yield m
    m.close()


def test_offload_sequence_and_indices(mem, monkeypatch):
    monkeypatch.setattr(vhostnet, "VhostNet", FakeVhost)
    FakeVhost.log = []
    off = VhostNetOffload([42])
    path = FakePath(mem)
    off.bind(path)
    queues = [Virtqueue(mem, i, 256, fast=False) for i in range(3)]
    for i, q in enumerate(queues[:2]):
        q.size = 256
        q.desc_addr, q.avail_addr, q.used_addr = 0x10000 * (i + 1), 0x10000 * (i + 1) + 0x1000, 0x10000 * (i + 1) + 0x2000
        q.activate()
        q.last_avail_idx = 5
    off.start(queues, (1 << 32) | (1 << 15) | (1 << 5), 1)
    names = [e[0] for e in FakeVhost.log]
    assert names[:2] == ["set_owner", "get_features"]
    assert FakeVhost.log[2] == ("set_features", (1 << 32) | (1 << 15))   # MAC (not vhost's) and NET_HDR out
    assert names[3] == "set_mem_table" and FakeVhost.log[3][1] == [(0, 1 << 20, mem.host_address(0))]
    ring = [e for e in FakeVhost.log[4:] if e[1] == 0]
    assert [e[0] for e in ring] == ["set_vring_num", "set_vring_base", "set_vring_addr", "set_vring_kick",
                                    "set_vring_call", "set_backend"]
    assert ring[1] == ("set_vring_base", 0, 5) and ring[3] == ("set_vring_kick", 0, 100)
    assert ring[2] == ("set_vring_addr", 0, mem.host_address(0) + 0x10000, mem.host_address(0) + 0x12000,
                       mem.host_address(0) + 0x11000)
    assert ring[4] == ("set_vring_call", 0, 200) and ring[5] == ("set_backend", 0, 42)
    assert path.taken == [0, 1]
    mem.write_u16(0x12000 + 2, 3)       # the used index the "kernel" published for rx
    FakeVhost.log = []
    off.stop()
    assert ("set_backend", 1, -1) in FakeVhost.log and ("get_vring_base", 0) in FakeVhost.log
    assert queues[0].last_avail_idx == 7 and queues[1].last_avail_idx == 8
    assert queues[0].used_idx == 3 and sorted(path.released) == [("call", 0), ("call", 1), ("kick", 0), ("kick", 1)]


def test_ring_outside_ram_is_refused(mem):
    assert host_address(mem, 0x1000, 16) == mem.host_address(0) + 0x1000
    with pytest.raises(DeviceError):
        host_address(mem, (1 << 20) - 8, 16)


def test_missing_device_is_one_line():
    with pytest.raises(DeviceError) as e:
        VhostNet("/nonexistent/vhost-net")
    assert "modprobe vhost_net" in str(e.value) and "\n" not in str(e.value)


NETNS_SCRIPT = textwrap.dedent(r'''
    import json, logging, subprocess
    from kvmpy.devices.virtio.netspec import parse_nic_spec
    from kvmpy.errors import DeviceError
    from kvmpy.vhost.nic import make_nic
    records = []
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: records.append(r.getMessage())})())
    out = {}
    try:
        make_nic(parse_nic_spec("tap,ifname=kv0,vhost=on"), vhost_path="/nonexistent/vhost-net")
    except DeviceError as e:
        out["on"] = str(e)
    out["left"] = "kv0" in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    nic = make_nic(parse_nic_spec("tap,ifname=kv1"), vhost_path="/nonexistent/vhost-net")
    out["auto"] = nic.offload is None
    out["log"] = records
    nic.close()
    print("RESULT", json.dumps(out))
''')


def test_vhost_modes_without_the_device():
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root (CAP_NET_ADMIN) and unshare(1) for a private network namespace")
    r = subprocess.run(["unshare", "-n", sys.executable, "-c", NETNS_SCRIPT], capture_output=True, text=True,
                       timeout=60, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout.split("RESULT ", 1)[1])
    assert "opening /nonexistent/vhost-net" in out["on"] and not out["left"]
    assert out["auto"] and len(out["log"]) == 1 and "userspace" in out["log"][0]


class StubTap:
    fds = [42]

    def set_guest_offloads(self, offloads):
        pass


def _offloaded_card(mem, monkeypatch):
    """A virtio-net function on a recorded vhost-net, as the wiring makes it (offload bound)."""
    from kvmpy.devices.virtio.net import VirtioNet
    from kvmpy.devices.virtio.transport import VirtioPciDevice
    monkeypatch.setattr(vhostnet, "VhostNet", FakeVhost)
    off = VhostNetOffload(StubTap.fds)
    net = VirtioNet(StubTap(), bytes.fromhex("525400123456"), offload=off)
    dev = VirtioPciDevice(net, mem)
    off.bind(FakePath(mem))
    return net, dev


def _booted_card(mem, monkeypatch):
    """_offloaded_card after a mock driver negotiated, set up rx, tx and ctrl, and DRIVER_OK."""
    from support.mock_driver import BumpAllocator, MockPciDriver
    net, dev = _offloaded_card(mem, monkeypatch)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x40000))
    assert drv.negotiate(drv.device_features())
    for i in range(3):
        drv.setup_queue(i, size=64)
    drv.driver_ok()
    return net, dev


def test_restored_card_reaches_the_kernel_when_the_machine_runs(mem, monkeypatch):
    """Issue 12's stall of a vhost=on destination: an incoming card's rings go to vhost-net at
    resume(), not in the middle of the board's restore (where vhost signalled the irqfd before
    KVM_SET_LAPIC wiped the interrupt); then from the restored avail index, and every resume
    after a pause starts them again."""
    FakeVhost.log = []
    net, dev = _booted_card(mem, monkeypatch)
    assert ("set_backend", 0, 42) in FakeVhost.log      # a booted guest's card: at DRIVER_OK
    net.quiesce()                                       # Board.pause: rings stopped, read back (7, 8)
    state = dev.state()
    assert [s.last_avail_idx for s in state.queues[:2]] == [7, 8]

    FakeVhost.log = []
    dest, dest_dev = _offloaded_card(mem, monkeypatch)
    dest_dev.restore(state)
    started = [e for e in FakeVhost.log if e[0] in ("set_vring_base", "set_vring_kick", "set_backend")]
    assert started == [] and dest.active, "vhost-net started during the restore"
    dest.resume()
    assert ("set_vring_base", 0, 7) in FakeVhost.log and ("set_vring_base", 1, 8) in FakeVhost.log
    assert ("set_backend", 0, 42) in FakeVhost.log and ("set_backend", 1, 42) in FakeVhost.log
    FakeVhost.log = []
    dest.quiesce()                                      # a pause: taken back, then handed over again
    dest.resume()
    assert ("set_backend", 0, -1) in FakeVhost.log and FakeVhost.log[-1] == ("set_backend", 1, 42)
    dest.close()
    net.close()


def test_restored_card_falls_back_to_userspace_when_vhost_refuses_at_resume(mem, monkeypatch):
    """What activate() does for a booted card, resume() does for a restored one: one log line
    and the TAP watched in userspace, not an error out of the machine's resume."""
    FakeVhost.log = []
    net, dev = _booted_card(mem, monkeypatch)
    net.quiesce()
    state = dev.state()
    dest, dest_dev = _offloaded_card(mem, monkeypatch)
    watched = []
    dest.watch_fd = lambda fd, cb: watched.append((fd, cb is not None))
    dest_dev.restore(state)

    def refuse(*args):
        raise DeviceError("starting vhost-net", detail="refused")
    monkeypatch.setattr(dest.offload, "start", refuse)
    dest.resume()
    assert watched == [(42, True)]
    dest.close()
    net.close()


def test_state_of_a_running_offloaded_card_has_the_kernels_ring_indices(mem, monkeypatch):
    """Unpaused (an API user's dev.state()): the backend reads vhost's indices back into the
    queues while saying its state, so the transport must ask it before the queues."""
    FakeVhost.log = []
    net, dev = _booted_card(mem, monkeypatch)
    state = dev.state()
    assert [s.last_avail_idx for s in state.queues[:2]] == [7, 8]
    net.close()
