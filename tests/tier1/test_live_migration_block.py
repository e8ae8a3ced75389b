"""Block migration (the `block` capability) of the counter guest between processes over unix:,
on this host's KVM. The tiny guests have no virtio-blk driver, so the test is the driver: it
brings the source's virtio-blk up through its PCI registers (tests/support/mock_driver, rings in
guest RAM the counter leaves alone) and keeps writing the disk while the guest runs and the
migration copies it, alternating requests the C data path serves with ones only the Python path
takes (header and data in one descriptor). The destination's image equals the source's at
switchover, byte for byte; the read-only drive is not copied; the source's image is untouched
afterwards; the ticks continue."""
from __future__ import annotations

import hashlib
import os
import re
import struct
import subprocess
import sys
import threading

import numpy as np
import pytest

from kvmpy import Machine
from kvmpy.devices.virtio import fastpath
from kvmpy.devices.virtio.blk import T_OUT, VirtioBlk
from kvmpy.errors import MigrationError, StateError
from kvmpy.monitor.commands import build_commands
from support.mock_driver import BumpAllocator, MockPciDriver

from support.migration import migrate_when_listening
from test_live_migration import counter_elf, ticks  # noqa: F401 (fixture)

IMAGE_BYTES = 8 << 20
RINGS, HDR, DATA, STATUS = 48 << 20, 50 << 20, 51 << 20, 52 << 20     # above the counter's pages

DESTINATION = r"""
import hashlib, sys
from kvmpy import Machine
uri, image, ro = sys.argv[1:4]
with Machine(memory="64M", drives=[f"file={image}", f"file={ro},readonly=on"], incoming=uri, paused=True) as m:
    m.incoming(uri)
    assert m.status == "paused", m.status
    with open(image, "rb") as f:
        print("IMAGE", hashlib.sha256(f.read()).hexdigest(), flush=True)
    m.resume()
    for _ in range(3):
        m.console.expect(r"tick [0-9a-f]{8}\n", timeout=30)
    print("CONSOLE", repr(m.console.text), flush=True)
"""


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class DiskWriter(threading.Thread):
    """The test as the guest's disk driver: writes random data at random sectors for as long as
    the source machine runs (checked under its lock, so no write slips past the switchover)."""

    def __init__(self, machine: Machine):
        super().__init__(daemon=True)
        self.machine = machine
        entry = next(e for e in machine.board.devices if isinstance(getattr(e.device, "device", None), VirtioBlk)
                     and not e.device.device.readonly)
        self.dev, self.blk = entry.device, entry.device.device
        (self.queue,) = MockPciDriver(self.dev, machine.memory, BumpAllocator(RINGS, RINGS + (1 << 20))).start(1)
        self.requests = {"plain": 0, "python-only": 0}
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(7)
        mem = self.machine.memory
        n = 0
        try:
            while not self.stop.is_set():
                length = int(rng.integers(1, 64)) * 512
                sector = int(rng.integers((IMAGE_BYTES - length) // 512))
                data = rng.bytes(length)
                header = struct.pack("<IIQ", T_OUT, 0, sector)
                with self.machine._lock:
                    if self.machine.status != "running":
                        return
                    if n % 2:       # header and data in one descriptor: VirtioBlk._handle, Python
                        mem.write(HDR, header + data)
                        segs = [(HDR, 16 + length, False)]
                    else:           # the usual layout: the C loop when it is on
                        mem.write(HDR, header)
                        mem.write(DATA, data)
                        segs = [(HDR, 16, False), (DATA, length, False)]
                    self.queue.add(segs + [(STATUS, 1, True)])
                    self.dev.handle_notify(0)
                    self.queue.used()
                    assert mem.read(STATUS, 1)[0] == 0, "a disk write failed"
                self.requests["python-only" if n % 2 else "plain"] += 1
                n += 1
                self.stop.wait(0.001)       # let the migration thread have the machine's lock
        except BaseException as e:      # reported by the test
            self.error = e


def test_block_migration_copies_the_disk_the_guest_writes(counter_elf, tmp_path):
    src_img, dst_img, ro_img = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "ro.img"
    src_img.write_bytes(os.urandom(IMAGE_BYTES // 2))
    os.truncate(src_img, IMAGE_BYTES)                   # half data, half hole
    dst_img.write_bytes(os.urandom(IMAGE_BYTES))        # whatever was there before is overwritten
    ro_img.write_bytes(os.urandom(1 << 20))
    ro_before = digest(ro_img)
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dest = subprocess.Popen([sys.executable, "-c", DESTINATION, uri, str(dst_img), str(ro_img)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Machine(kernel=counter_elf, memory="64M", drives=[f"file={src_img}", f"file={ro_img},readonly=on"]) as src:
            src.migration_capabilities["block"] = True
            src.migration_parameters["max-bandwidth"] = 32 << 20     # the copy takes a while: writes overlap it
            src.start()
            src.console.expect(r"tick 00000003", timeout=20)
            writer = DiskWriter(src)
            c_before = writer.blk._cblk.completed if writer.blk._cblk is not None else 0
            writer.start()
            stats = migrate_when_listening(src, uri)
            writer.join(10)
            assert writer.error is None, repr(writer.error)
            assert src.status == "postmigrate"
            at_switchover = digest(src_img)
            before = src.console.text
        out, err = dest.communicate(timeout=120)
        assert dest.returncode == 0, err
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    received = re.search(r"^IMAGE ([0-9a-f]{64})$", out, re.M).group(1)
    assert received == at_switchover, "the destination's image differs from the source's at switchover"
    assert digest(src_img) == at_switchover, "the source's image changed after the switchover"
    assert digest(ro_img) == ro_before
    assert writer.requests["plain"] > 10 and writer.requests["python-only"] > 10, writer.requests
    if fastpath.ENABLED:
        assert writer.blk._cblk.completed - c_before >= writer.requests["plain"], "the C path did not serve writes"
    disk = stats["disk"]
    assert disk["total"] == IMAGE_BYTES and disk["remaining"] == 0 and disk["transferred"] >= IMAGE_BYTES // 2
    after = eval(re.search(r"^CONSOLE (.*)$", out, re.M).group(1))
    all_ticks = ticks(before + after)
    assert all_ticks == list(range(1, len(all_ticks) + 1)), "a tick was lost or repeated across the migration"


REFUSING_DESTINATION = r"""
import sys
from kvmpy import Machine
from kvmpy.errors import MigrationError
uri, image = sys.argv[1:3]
with Machine(memory="64M", drives=[f"file={image}"], incoming=uri, paused=True) as m:
    try:
        m.incoming(uri)
    except MigrationError as e:
        print("REFUSED", e, flush=True)
"""


def test_block_migration_onto_the_sources_own_image_is_refused(counter_elf, tmp_path):
    """Shared storage with `block` on: the destination would copy onto the disk the running
    source uses. It refuses (the image's lock is the source's) and the source runs on."""
    image = tmp_path / "shared.img"
    image.write_bytes(os.urandom(1 << 20))
    before = digest(image)
    uri = f"unix:{tmp_path / 'mig.sock'}"
    dest = subprocess.Popen([sys.executable, "-c", REFUSING_DESTINATION, uri, str(image)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Machine(kernel=counter_elf, memory="64M", drives=[f"file={image}"]) as src:
            src.migration_capabilities["block"] = True
            src.start()
            src.console.expect(r"tick 00000002", timeout=20)
            try:
                migrate_when_listening(src, uri)
                raise AssertionError("the block migration onto the source's own image went through")
            except MigrationError as e:
                assert "refused the block migration" in str(e) and "holds its image" in str(e), str(e)
            assert src.status == "running"
            seen = len(ticks(src.console.text))
            src.console.expect(rf"tick {seen + 1:08x}", timeout=20)       # still counting
        out, err = dest.communicate(timeout=60)
    finally:
        if dest.poll() is None:
            dest.kill()
            dest.wait()
    assert "REFUSED" in out and "holds its image" in out, (out, err)
    assert digest(image) == before, "the refused migration wrote the image"


def test_block_is_a_capability_and_needs_a_live_destination(counter_elf, tmp_path):
    with Machine(kernel=counter_elf, memory="64M") as m:
        assert m.migration_capabilities["block"] is False
        with pytest.raises(StateError, match="block migration copies disks to a live destination"):
            m.migrate(f"file:{tmp_path / 'vm.snap'}", blk=True)
        migrate = build_commands()["migrate"]          # QMP's migrate takes QEMU's old `blk` too
        assert migrate.args["blk"].optional
        with pytest.raises(StateError, match="block migration"):
            migrate.run(m, {"uri": f"file:{tmp_path / 'vm.snap'}", "blk": True})
        assert not (tmp_path / "vm.snap").exists()
