"""Tier 0: QMP set_link (QEMU's qapi/net.json spelling: `name`, `up`) through the monitor's
session against the fake machine, and the Machine's side of it (find the NIC by its device id,
set its link, keep the setting for a rebuilt board) on a real VirtioNet without /dev/kvm."""
import json
import socket
import threading
from types import SimpleNamespace

import pytest

from kvmpy.devices.virtio.net import VirtioNet
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.machine.api import MachineApiMixin
from kvmpy.machine.devices import DeviceTable
from kvmpy.memslots import GuestMemory
from kvmpy.monitor.protocol import QmpSession
from support.fake_machine import FakeMachine

MAC = bytes.fromhex("525400123456")


@pytest.fixture
def session():
    machine = FakeMachine()
    s = QmpSession(machine)
    assert s.handle_request({"execute": "qmp_capabilities"})[0] == {"return": {}}
    yield s, machine
    machine.close()


def execute(s, arguments):
    reply, _ = s.handle_request({"execute": "set_link", "arguments": arguments})
    json.dumps(reply)
    return reply


def test_set_link_is_listed_by_query_commands(session):
    s, _ = session
    reply, _ = s.handle_request({"execute": "query-commands"})
    assert {"name": "set_link"} in reply["return"]


def test_set_link_down_and_up_reaches_the_machine(session):
    s, machine = session
    assert execute(s, {"name": "net1", "up": False}) == {"return": {}}
    assert machine.links == {"net0": True, "net1": False}
    assert execute(s, {"name": "net1", "up": True}) == {"return": {}}
    assert machine.links["net1"] is True
    assert machine.calls[-2:] == ["set_link net1 down", "set_link net1 up"]


def test_unknown_nic_is_qemus_device_not_found(session):
    s, machine = session
    reply = execute(s, {"name": "eth9", "up": False})
    assert reply["error"] == {"class": "DeviceNotFound", "desc": "Device 'eth9' not found"}
    assert machine.links == {"net0": True, "net1": True}


@pytest.mark.parametrize("arguments, desc", [
    ({"up": False}, "Parameter 'name' is missing"),
    ({"name": "net0"}, "Parameter 'up' is missing"),
    ({"name": "net0", "up": "false"}, "Invalid parameter type for 'up', expected: boolean"),
    ({"name": "net0", "up": 0}, "Invalid parameter type for 'up', expected: boolean"),
    ({"name": 0, "up": True}, "Invalid parameter type for 'name', expected: string"),
    ({"name": "net0", "up": True, "queue": 1}, "Parameter 'queue' is unexpected"),
])
def test_set_link_arguments_are_checked_with_qemus_words(session, arguments, desc):
    s, machine = session
    reply = execute(s, arguments)
    assert reply["error"] == {"class": "GenericError", "desc": desc}
    assert machine.links == {"net0": True, "net1": True} and not any("set_link" in c for c in machine.calls)


# --- the Machine's half: MachineApiMixin.set_link over a device table ---------------------------
class BoardlessMachine(MachineApiMixin):
    """Just what MachineApiMixin.set_link needs of a Machine: config.nics, board, _lock."""

    def __init__(self, nics: int):
        self.config = SimpleNamespace(nics=[object()] * nics)
        self.board = None
        self._lock = threading.RLock()
        self._port_hooks = []


@pytest.fixture
def mem():
    m = GuestMemory.create(1 << 20)
    yield m
    m.close()


def board_with_nic(mem, ends):
    """A board holding one VirtioNet (in its PCI function, as platform.py adds it) as "net0"."""
    dev_end, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ends.append(dev_end)
    net = VirtioNet(SimpleNamespace(fds=[dev_end.fileno()], set_guest_offloads=lambda o: None), MAC)
    devices = DeviceTable()
    devices.add("net0", "virtio-net-pci", VirtioPciDevice(net, mem))
    return SimpleNamespace(devices=devices), net


def test_machine_set_link_finds_the_nic_by_id_and_a_new_board_keeps_it(mem):
    ends: list = []
    try:
        machine = BoardlessMachine(nics=1)
        machine.board, net = board_with_nic(mem, ends)
        assert machine.set_link("net1", False) is False and net.link_up
        assert machine.set_link("net0", False) is True and not net.link_up
        machine.board, rebuilt = board_with_nic(mem, ends)     # a guest reboot rebuilds the devices
        assert rebuilt.link_up
        machine._apply_port_hooks()                            # what every new board goes through
        assert not rebuilt.link_up, "a reboot brought a link set down back up"
        assert machine.set_link("net0", True) is True and rebuilt.link_up
    finally:
        for end in ends:
            end.close()


def test_machine_set_link_before_any_board_applies_at_the_first(mem):
    ends: list = []
    try:
        machine = BoardlessMachine(nics=1)
        assert machine.set_link("net0", False) is True
        machine.board, net = board_with_nic(mem, ends)
        machine._apply_port_hooks()
        assert not net.link_up
    finally:
        for end in ends:
            end.close()
