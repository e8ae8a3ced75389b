"""The device table of the tier-0 state tests (test_device_state*.py): for every device, how to
make a fresh one, how to drive it into a state that is not its reset state, its DEVICE_KIND, and
hostile edits of its state that restore() must refuse."""
from __future__ import annotations

import copy
import dataclasses
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

from kvmpy.devices import acpi_pm, debug_exit, fw_cfg, i8042, legacy, rtc, serial
from kvmpy.devices.irq import RecordingIrqLine
from kvmpy.devices.pci import PciRoot
from kvmpy.devices.virtio.blk import BlkState, VirtioBlk
from kvmpy.devices.virtio.console import MAX_PENDING_INPUT, ConsoleState, VirtioConsole
from kvmpy.devices.virtio.device import STATUS_DRIVER_OK
from kvmpy.devices.virtio.drive import DriveSpec
from support.mock_driver import BumpAllocator, MockPciDriver
from kvmpy.devices.virtio.net import VirtioNet
from kvmpy.devices.virtio.netctrl import RX_PROMISC
from kvmpy.devices.virtio.rng import RngState, VirtioRng
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.memslots import GuestMemory
from kvmpy.state import STATE_CLASSES
from support.fakes import Clock, MsiSink, Sink  # noqa: F401  (re-exported for the device tests)

RAM = 1 << 20
DATA = 0x90000            # request buffers; rings are allocated in [0x10000, 0x80000)
SECTORS = 64


class FakeTap:
    """A SOCK_SEQPACKET socketpair standing in for a TAP (keeps frame boundaries)."""

    def __init__(self) -> None:
        self.device_end, self.host_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.device_end.setblocking(False)
        self.fds = [self.device_end.fileno()]

    def set_guest_offloads(self, offloads: int) -> None:
        pass

    def close(self) -> None:
        self.device_end.close()
        self.host_end.close()


@dataclass
class Env:
    """What a device needs from its test: guest RAM, a directory for disk images, one clock;
    it closes the disks and taps it opened."""
    mem: GuestMemory
    tmp: Any
    clock: Clock = field(default_factory=Clock)
    opened: list[VirtioBlk] = field(default_factory=list)
    taps: list[FakeTap] = field(default_factory=list)

    def new_disk(self) -> VirtioBlk:
        """A fresh image per device (each holds an exclusive lock on its own)."""
        path = self.tmp / f"disk{len(self.opened)}.img"
        path.write_bytes(bytes(range(256)) * (SECTORS * 2))
        blk = VirtioBlk(DriveSpec(str(path), serial="state-test"))
        self.opened.append(blk)
        return blk

    def new_net(self) -> VirtioNet:
        self.taps.append(FakeTap())
        return VirtioNet(self.taps[-1], bytes.fromhex("525400123456"))

    def close(self) -> None:
        for blk in self.opened:
            blk.close()
        for tap in self.taps:
            tap.close()
        self.opened, self.taps = [], []


Mutator = Callable[[Any], None]     # edits a deep copy of a good state in place


@dataclass
class Case:
    make: Callable[[Env], Any]
    drive: Callable[[Any, Env], None]
    kind: str
    hostile: dict[str, Mutator]


def _set(**fields: Any) -> Mutator:
    def mutate(s: Any) -> None:
        for name, value in fields.items():
            setattr(s, name, value)
    return mutate


# -- legacy devices ----------------------------------------------------------------------------
def drive_serial(u: serial.Serial16550, env: Env) -> None:
    u.write(serial.LCR, bytes([serial.LCR_DLAB]))
    u.write(serial.RBR_THR_DLL, b"\x01")
    u.write(serial.LCR, b"\x03")
    u.write(serial.IIR_FCR, bytes([serial.FCR_ENABLE | 0x80]))
    u.write(serial.IER_DLM, bytes([serial.IER_RDA | serial.IER_THRE]))
    u.write(serial.MCR, bytes([serial.MCR_OUT2 | serial.MCR_DTR]))
    u.write(serial.SCR, b"\x5a")
    assert u.enqueue_input(b"x" * 40) == 40    # 16 in the FIFO, 24 in the backlog
    u.write(serial.RBR_THR_DLL, b"A")


def drive_i8042(dev: i8042.I8042, env: Env) -> None:
    dev.write(i8042.COMMAND_OFFSET, b"\xa7")           # disable the AUX port
    dev.push_keyboard_data(b"\x1c\x9c")
    dev.write(i8042.COMMAND_OFFSET, b"\xd4")           # next data byte goes to the mouse


def rtc_put(dev: rtc.CmosRtc, reg: int, value: int) -> None:
    dev.write(0, bytes((reg,)))
    dev.write(1, bytes((value,)))


def drive_rtc(dev: rtc.CmosRtc, env: Env) -> None:
    rtc_put(dev, rtc.YEAR, 0x31)
    rtc_put(dev, 0x50, 7)
    rtc_put(dev, rtc.REG_A, rtc.A_DIVIDER_NORMAL | 0x0F)     # 2 Hz periodic
    rtc_put(dev, rtc.REG_B, rtc.B_24H | rtc.B_UIE | rtc.B_PIE)
    env.clock.t += 1.3
    dev.poll()
    dev.write(0, bytes((0x80 | 0x40,)))                       # NMI off, index 0x40


def drive_pm(pm: acpi_pm.AcpiPm, env: Env) -> None:
    pm.write(acpi_pm.PM1_EN_OFFSET, struct.pack("<H", 0x0100))
    pm.write(acpi_pm.PM1_CNT_OFFSET, struct.pack("<H", acpi_pm.SCI_EN | acpi_pm.BM_RLD | 3 << 10))
    env.clock.t += 0.001


def drive_port61(dev: legacy.SystemControlPortB, env: Env) -> None:
    dev.write(0, b"\x03")
    for _ in range(5):
        dev.read(0, 1)


def drive_probe(dev: legacy.ProbeSink, env: Env) -> None:
    dev.read(0, 1)
    dev.write(0, b"\x00")
    dev.write(0, b"\x00")


def drive_pci_root(root: PciRoot, env: Env) -> None:
    root.write(0, (0x8000_000C).to_bytes(4, "little"))
    root.write(5, b"\x40")                                     # host bridge latency timer
    root.write(0, (0x8000_0004).to_bytes(4, "little"))
    root.write(4, b"\x06\x00")                                 # memory + bus master
    root.write(0, (0x8000_0810).to_bytes(4, "little"))         # slot 1, BAR0: latched only


# -- virtio-pci devices ------------------------------------------------------------------------
def new_virtio(backend: Any, env: Env) -> VirtioPciDevice:
    return VirtioPciDevice(backend, env.mem, MsiSink(), RecordingIrqLine())


def driver(dev: VirtioPciDevice, env: Env) -> MockPciDriver:
    return MockPciDriver(dev, env.mem, BumpAllocator(0x10000, 0x80000))


def drive_rng(dev: VirtioPciDevice, env: Env) -> None:
    (q,) = driver(dev, env).start(1, msix=True)
    q.add([(DATA, 16, True)])
    dev.handle_notify(0)
    assert len(q.used()) == 1
    q.add([(DATA, 16, True)])                # posted, not yet notified: the ring is ahead


def drive_blk(dev: VirtioPciDevice, env: Env) -> None:
    (q,) = driver(dev, env).start(1)
    env.mem.write(DATA, struct.pack("<IIQ", 8, 0, 0))           # GET_ID
    q.add([(DATA, 16, False), (DATA + 0x100, 20, True), (DATA + 0x200, 1, True)])
    dev.handle_notify(0)
    assert q.used() and env.mem.read(DATA + 0x200, 1) == b"\x00"


def drive_console(dev: VirtioPciDevice, env: Env) -> None:
    rx, tx = driver(dev, env).start(2, msix=True)
    env.mem.write(DATA, b"hello")
    tx.add([(DATA, 5, False)])
    dev.handle_notify(1)
    rx.add([(DATA + 0x100, 4, True)])
    console = dev.device
    assert console.enqueue_input(b"abcdefg") == 7               # 4 delivered, 3 left pending
    assert console.state().pending_input == b"efg"


def drive_net(dev: VirtioPciDevice, env: Env) -> None:
    rx, tx, ctrl = driver(dev, env).start(3, msix=True)
    frame = bytes(12) + bytes.fromhex("525400abcdef525400123456") + b"\x08\x00" + b"x" * 50
    env.mem.write(DATA, frame)
    tx.add([(DATA, len(frame), False)])
    dev.handle_notify(1)
    assert len(tx.used()) == 1 and env.taps[-1].host_end.recv(2048) == frame
    net = dev.device
    net.rx_filter.set_mode(RX_PROMISC, False)
    net.set_link(False)


def _queue(i: int, **fields: Any) -> Mutator:
    def mutate(s: Any) -> None:
        for name, value in fields.items():
            setattr(s.queues[i], name, value)
    return mutate


def _pci_byte(offset: int, xor: int) -> Mutator:
    def mutate(s: Any) -> None:
        cfg = bytearray(s.pci.config if hasattr(s, "pci") else s.host_bridge.config)
        cfg[offset] ^= xor
        if hasattr(s, "pci"):
            s.pci.config = bytes(cfg)
        else:
            s.host_bridge.config = bytes(cfg)
    return mutate


def _msix_table(edit: Callable[[bytes], bytes]) -> Mutator:
    def mutate(s: Any) -> None:
        s.msix.table = edit(s.msix.table)
    return mutate


def _pending_beyond_vectors(s: Any) -> None:
    s.msix.pending = 1 << 40


def _last_queue_ahead(s: Any) -> None:
    q = s.queues[-1]
    q.last_avail_idx = (q.used_idx + q.size + 1) & 0xFFFF


VIRTIO_HOSTILE: dict[str, Mutator] = {
    "one queue missing": lambda s: s.queues.pop(),
    "one queue too many": lambda s: s.queues.append(copy.deepcopy(s.queues[-1])),
    "queues not a list": _set(queues=3),
    "last queue's used ring outside RAM": _queue(-1, used_addr=RAM - 8),
    "last queue's size not a power of two": _queue(-1, size=6),
    "last queue ready is an int": _queue(-1, ready=1),
    "last queue more in flight than fits": _last_queue_ahead,
    "last queue index beyond 16 bits": _queue(-1, used_idx=0x1_0000),
    "last queue's MSI-X vector does not exist": _queue(-1, msix_vector=0x40),
    "MSI-X table one byte short": _msix_table(lambda t: t[:-1]),
    "MSI-X reserved vector-control bits": _msix_table(lambda t: t[:13] + b"\x01" + t[14:]),
    "MSI-X pending bit beyond the vectors": _pending_beyond_vectors,
    "config space vendor id changed": _pci_byte(0, 0x01),
    "config space capability pointer changed": _pci_byte(0x34, 0x04),
    "config space 255 bytes": lambda s: setattr(s.pci, "config", s.pci.config[:-1]),
    "driver features not offered": lambda s: setattr(s, "driver_features", s.driver_features | 1 << 63),
    "DRIVER_OK without FEATURES_OK": _set(status=STATUS_DRIVER_OK),
    "isr reserved bits": _set(isr=0x04),
    "status beyond 8 bits": _set(status=0x100),
    "negative feature select": _set(device_feature_select=-1),
    "config vector does not exist": _set(config_msix_vector=0x100),
    "pci part of the wrong class": lambda s: setattr(s, "pci", copy.deepcopy(s.msix)),
}


def _backend(state: Any) -> Mutator:
    def mutate(s: Any) -> None:
        s.device = state
    return mutate


CASES: dict[str, Case] = {
    "serial": Case(lambda e: serial.Serial16550(RecordingIrqLine()), drive_serial, "isa-serial", {
        "dll beyond 8 bits": _set(dll=0x100), "ier reserved bit": _set(ier=0x10),
        "mcr reserved bit": _set(mcr=0x20), "fcr reserved bit": _set(fcr=0x02),
        "lsr_errors a bool": _set(lsr_errors=True), "thr_pending an int": _set(thr_pending=1),
        "rx_fifo over 16 bytes": _set(rx_fifo=b"x" * 17),
        "backlog over the limit": _set(backlog=b"x" * (serial.DEFAULT_BACKLOG + 1)),
        "rx_fifo a str": _set(rx_fifo="x")}),
    "i8042": Case(lambda e: i8042.I8042(on_reset=lambda: None, kbd_irq=RecordingIrqLine(),
                                        aux_irq=RecordingIrqLine()), drive_i8042, "i8042", {
        "scancode set 4": _set(scancode_set=4), "scancode set True": _set(scancode_set=True),
        "output byte 0x100": _set(output=[(0x100, False)]),
        "output queue overlong": _set(output=[(1, False)] * (i8042.OUTPUT_QUEUE_LIMIT + 1)),
        "output entry of three": _set(output=[(1, False, 0)]),
        "pending command without argument": _set(pending_command=0x20),
        "keyboard pending unknown": _set(keyboard_pending=0x12),
        "last_was_command an int": _set(last_was_command=1)}),
    "rtc": Case(lambda e: rtc.CmosRtc(RecordingIrqLine(), e.clock), drive_rtc, "mc146818rtc", {
        "cmos 127 bytes": _set(cmos=bytes(127)), "index 128": _set(index=128),
        "offset a float": _set(offset_s=0.5), "offset beyond 1500 years": _set(offset_s=rtc.MAX_OFFSET_S + 1),
        "periodic beyond the slowest rate": _set(periodic_remaining_us=rtc.MAX_PERIOD_US + 1),
        "negative periodic": _set(periodic_remaining_us=-1),
        "nmi_disabled an int": _set(nmi_disabled=1), "last_second a str": _set(last_second="0"),
        "register C reserved bits": lambda s: setattr(s, "cmos", s.cmos[:rtc.REG_C] + b"\x01" + s.cmos[rtc.REG_C + 1:])}),
    "acpi-pm": Case(lambda e: acpi_pm.AcpiPm(lambda: None, lambda: None, clock_ns=e.clock.ns), drive_pm, "acpi-pm", {
        "status reserved bit": _set(pm1_status=0x0002), "enable reserved bit": _set(pm1_enable=0x8000),
        "control SLP_EN": _set(pm1_control=acpi_pm.SLP_EN), "timer beyond 24 bits": _set(timer=1 << 24),
        "timer negative": _set(timer=-1), "status beyond 32 bits": _set(pm1_status=1 << 40)}),
    "debug-exit": Case(lambda e: debug_exit.DebugExit(on_exit=lambda code: None),
                       lambda d, e: d.write(0, b"\x02"), "isa-debug-exit", {
        "even code": _set(last_code=4), "code a bool": _set(last_code=True),
        "code beyond 33 bits": _set(last_code=(1 << 33) + 1)}),
    "fw_cfg": Case(lambda e: fw_cfg.FwCfg(e.mem, fw_cfg.build_items(e.mem.size, 2, [("opt/t", b"hello")])),
                   lambda d, e: (d.write(0, fw_cfg.FW_CFG_FILE_FIRST.to_bytes(2, "little")), d.read(1, 1),
                                 d.write(fw_cfg.DMA_OFFSET, b"\0\0\0\1")), "fw_cfg_io", {
        "selector beyond 16 bits": _set(selector=0x10000), "offset past the item": _set(offset=6),
        "negative offset": _set(offset=-1), "dma_high a bool": _set(dma_high=True),
        "dma_high beyond 32 bits": _set(dma_high=1 << 32)}),
    "port80": Case(lambda e: legacy.PostCodePort(), lambda d, e: (d.write(0, b"\x42"), d.write(0, b"\x43")),
                   "port80", {"code beyond 8 bits": _set(last_code=0x100), "negative writes": _set(writes=-1)}),
    "port92": Case(lambda e: legacy.FastA20Port(on_reset=lambda: None), lambda d, e: d.write(0, b"\x00"),
                   "port92", {"reserved bit": _set(value=0x04), "value a bool": _set(value=True)}),
    "port61": Case(lambda e: legacy.SystemControlPortB(), drive_port61, "port61", {
        "read-only bit": _set(value=0x10), "refresh an int": _set(refresh=1),
        "reads beyond the delay": _set(reads_since_gate=legacy.OUT2_DELAY_READS + 1)}),
    "probe-sink": Case(lambda e: legacy.ProbeSink("COM2"), drive_probe, "probe-sink", {
        "negative reads": _set(reads=-1), "writes beyond 63 bits": _set(writes=1 << 63)}),
    "pci-root": Case(lambda e: PciRoot(), drive_pci_root, "i440FX-pcihost", {
        "latch reserved bit": _set(config_address=0x8000_0001), "latch beyond 32 bits": _set(config_address=1 << 32),
        "latch a bool": _set(config_address=True),
        "host bridge device id changed": _pci_byte(2, 0x01),
        "host bridge config short": lambda s: setattr(s.host_bridge, "config", s.host_bridge.config[:-1]),
        "host bridge of the wrong class": _set(host_bridge=ConsoleState(b""))}),
    "virtio-rng": Case(lambda e: new_virtio(VirtioRng(), e), drive_rng, "virtio-rng-pci", {
        **VIRTIO_HOSTILE, "backend state of another backend": _backend(ConsoleState(b"")),
        "backend state missing": _backend(None)}),
    "virtio-blk": Case(lambda e: new_virtio(e.new_disk(), e), drive_blk, "virtio-blk-pci", {
        **VIRTIO_HOSTILE, "backend state of another backend": _backend(RngState()),
        "disk one sector bigger": _backend(BlkState(SECTORS + 1, False, "state-test")),
        "disk read-only": _backend(BlkState(SECTORS, True, "state-test")),
        "disk serial differs": _backend(BlkState(SECTORS, False, "other")),
        "disk capacity negative": _backend(BlkState(-1, False, "state-test"))}),
    "virtio-console": Case(lambda e: new_virtio(VirtioConsole(Sink()), e), drive_console, "virtio-serial-pci", {
        **VIRTIO_HOSTILE, "backend state of another backend": _backend(RngState()),
        "pending input over the limit": _backend(ConsoleState(b"x" * (MAX_PENDING_INPUT + 1))),
        "pending input a str": _backend(ConsoleState("abc"))}),
    "virtio-net": Case(lambda e: new_virtio(e.new_net(), e), drive_net, "virtio-net-pci", {
        **VIRTIO_HOSTILE, "backend state of another backend": _backend(RngState()),
        "MAC one byte": lambda s: setattr(s.device, "mac", b"\x00"),
        "two queue pairs on a one-pair device": lambda s: setattr(s.device, "queue_pairs", 2)}),
}

HOSTILE = [(name, bad) for name, case in CASES.items() for bad in case.hostile]


def driven(name: str, env: Env) -> Any:
    case = CASES[name]
    dev = case.make(env)
    case.drive(dev, env)
    return dev


def assert_plain(value: Any, path: str = "state") -> list[str]:
    """Raise unless `value` is data the stream codec carries; returns the state names inside."""
    if value is None or isinstance(value, (bool, int, str, bytes)):
        assert not isinstance(value, float), path
        return []
    if isinstance(value, (list, tuple)):
        return [n for i, v in enumerate(value) for n in assert_plain(v, f"{path}[{i}]")]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in assert_plain(k, path) + assert_plain(v, f"{path}[{k!r}]")]
    assert dataclasses.is_dataclass(value), f"{path} is a {type(value).__name__}, not plain data"
    name = getattr(type(value), "STATE_NAME", None)
    assert name is not None and STATE_CLASSES.get(name) is type(value), f"{path}: {type(value).__name__} is not @versioned"
    names = [name]
    for f in dataclasses.fields(value):
        names += assert_plain(getattr(value, f.name), f"{path}.{f.name}")
    return names
