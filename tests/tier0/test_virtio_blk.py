"""virtio-blk through the transport and mock driver, with temp image files (no /dev/kvm).
Every test runs twice: the pure-Python data path and the C one (fastpath.ENABLED)."""
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvmpy.devices.virtio.blk import (S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
                                      T_WRITE_ZEROES, VIRTIO_BLK_F_RO, BlkState, DriveSpec, VirtioBlk,
                                      parse_drive_spec)
from kvmpy.devices.virtio import fastpath
from kvmpy.devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from support.mock_driver import BumpAllocator, MockPciDriver
from kvmpy.devices.virtio.transport import VirtioPciDevice
from kvmpy.errors import ConfigError, DeviceError, StateError
from kvmpy.memslots import GuestMemory

SECTORS = 64
HDR, DATA, STATUS = 0x70000, 0x71000, 0x7F000


pytestmark = pytest.mark.usefixtures("datapath")  # every test on both data paths (conftest.py)


def c_requests(blk):
    """Requests the C loop completed itself (0 on the Python path)."""
    return blk._cblk.completed if blk._cblk is not None else 0


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (SECTORS * 2))
    return path


@pytest.fixture
def mem():
    m = GuestMemory.create(1 << 20)
    yield m
    m.close()


def start(mem, spec):
    blk = VirtioBlk(spec)
    dev = VirtioPciDevice(blk, mem)
    drv = MockPciDriver(dev, mem, BumpAllocator(0x10000, 0x60000))
    (q,) = drv.start(1)
    assert (blk._cblk is not None) == (dev.queues[0].cring is not None) == fastpath.ENABLED
    return blk, dev, drv, q


def request(mem, q, dev, rtype, sector, data=b"", in_len=0, indirect=False):
    mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector))
    mem.write(STATUS, b"\xee")
    segs = [(HDR, 16, False)]
    if data:
        mem.write(DATA, data)
        segs.append((DATA, len(data), False))
    if in_len:
        segs.append((DATA, in_len, True))
    segs.append((STATUS, 1, True))
    head = q.add(segs, indirect_at=0x7E000 if indirect else None)
    dev.handle_notify(0)
    (used,) = q.used()
    assert used[0] == head
    return mem.read(STATUS, 1)[0], used[1]


def test_capacity_and_features(mem, image):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    assert drv.config(0, 8) == SECTORS and drv.config(12, 4) == 254  # capacity, seg_max
    assert not drv.device_features() & VIRTIO_BLK_F_RO
    blk.close()


def test_read_write_flush(mem, image, datapath):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    assert request(mem, q, dev, T_IN, 1, in_len=1024) == (S_OK, 1025)
    assert mem.read(DATA, 1024) == image.read_bytes()[512:1536]
    payload = os.urandom(1024)
    assert request(mem, q, dev, T_OUT, 3, data=payload, indirect=True) == (S_OK, 1)
    assert image.read_bytes()[1536:2560] == payload
    assert c_requests(blk) == (2 if datapath == "c" else 0)
    assert request(mem, q, dev, T_FLUSH, 0) == (S_OK, 1)  # handed back to Python
    assert c_requests(blk) == (2 if datapath == "c" else 0)
    blk.close()


def test_cache_none_uses_o_direct_for_aligned_requests_only(mem, image, monkeypatch, datapath):
    blk, dev, drv, q = start(mem, DriveSpec(str(image), cache="none"))
    assert blk.direct_fd >= 0 and blk.direct_fd != blk.fd
    used_fds = []  # the Python path's syscalls are observable; the C path's are counted
    real_preadv, real_pwritev = os.preadv, os.pwritev
    monkeypatch.setattr(os, "preadv", lambda fd, *a: used_fds.append(fd) or real_preadv(fd, *a))
    monkeypatch.setattr(os, "pwritev", lambda fd, *a: used_fds.append(fd) or real_pwritev(fd, *a))
    direct = []
    assert request(mem, q, dev, T_IN, 8, in_len=4096) == (S_OK, 4097)
    direct.append(blk.direct_requests)
    assert mem.read(DATA, 4096) == image.read_bytes()[4096:8192]
    assert request(mem, q, dev, T_IN, 1, in_len=1024) == (S_OK, 1025)  # unaligned: page cache
    direct.append(blk.direct_requests)
    assert mem.read(DATA, 1024) == image.read_bytes()[512:1536]
    payload = os.urandom(4096)
    assert request(mem, q, dev, T_OUT, 16, data=payload) == (S_OK, 1)
    direct.append(blk.direct_requests)
    assert image.read_bytes()[8192:12288] == payload
    assert direct == [1, 1, 2]
    assert used_fds == ([] if datapath == "c" else [blk.direct_fd, blk.fd, blk.direct_fd])
    assert c_requests(blk) == (3 if datapath == "c" else 0)
    blk.close()
    assert blk.direct_fd == -1 and blk.fd == -1


def test_host_io_errors_answered_ioerr_and_logged(mem, image, caplog, datapath):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    os.truncate(image, 8 * 512)  # shrunk behind our back: reads past 4 KiB find end of file
    assert request(mem, q, dev, T_IN, 6, in_len=2048) == (S_IOERR, 1)  # short, then nothing
    assert request(mem, q, dev, T_IN, 2, in_len=1024) == (S_OK, 1025)
    good_fd, blk.fd = blk.fd, os.open(image, os.O_RDONLY)
    try:
        assert request(mem, q, dev, T_OUT, 0, data=b"w" * 512) == (S_IOERR, 1)  # EBADF
    finally:
        os.close(blk.fd)
        blk.fd = good_fd
    messages = [r.getMessage().replace(str(image), "IMG") for r in caplog.records if r.levelname == "WARNING"]
    assert messages == ["IMG: read failed: [Errno 5] short transfer",
                        "IMG: write failed: [Errno 9] Bad file descriptor"]
    assert c_requests(blk) == (3 if datapath == "c" else 0) and not dev.broken
    blk.close()


def test_scattered_header_and_data(mem, image):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    mem.write(HDR, struct.pack("<IIQ", T_IN, 0, 2))
    head = q.add([(HDR, 5, False), (HDR + 5, 11, False), (DATA, 100, True), (DATA + 0x800, 412, True),
                  (STATUS, 1, True)])
    dev.handle_notify(0)
    assert q.used() == [(head, 513)] and mem.read(STATUS, 1) == b"\x00"
    assert mem.read(DATA, 100) + mem.read(DATA + 0x800, 412) == image.read_bytes()[1024:1536]
    blk.close()


def test_out_of_range_and_unsupported(mem, image):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    assert request(mem, q, dev, T_IN, SECTORS, in_len=512)[0] == S_IOERR
    assert request(mem, q, dev, T_IN, SECTORS - 1, in_len=1024)[0] == S_IOERR
    assert request(mem, q, dev, T_IN, 2**64 - 1, in_len=512)[0] == S_IOERR
    assert request(mem, q, dev, T_IN, 0, in_len=100)[0] == S_IOERR  # not a sector multiple
    assert request(mem, q, dev, 99, 0)[0] == S_UNSUPP
    assert request(mem, q, dev, T_IN, SECTORS - 1, in_len=512)[0] == S_OK  # the last sector works
    assert request(mem, q, dev, T_IN, SECTORS, in_len=0) == (S_OK, 1)  # empty, at the end: fine
    assert request(mem, q, dev, T_IN, SECTORS + 1, in_len=0)[0] == S_IOERR  # empty, past the end
    blk.close()


def test_get_id_serial(mem, image):
    blk, dev, drv, q = start(mem, DriveSpec(str(image), serial="disk-0"))
    mem.fill(DATA, 32, 0xAA)
    assert request(mem, q, dev, T_GET_ID, 0, in_len=20) == (S_OK, 21)
    assert mem.read(DATA, 20) == b"disk-0" + b"\x00" * 14
    blk.close()


def test_discard_and_write_zeroes(mem, image):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    seg = struct.pack("<QII", 4, 2, 0)
    assert request(mem, q, dev, T_WRITE_ZEROES, 0, data=seg)[0] == S_OK
    assert image.read_bytes()[2048:3072] == bytes(1024)
    assert request(mem, q, dev, T_DISCARD, 0, data=struct.pack("<QII", 8, 1, 0))[0] == S_OK
    assert request(mem, q, dev, T_DISCARD, 0, data=struct.pack("<QII", SECTORS, 1, 0))[0] == S_IOERR
    assert request(mem, q, dev, T_DISCARD, 0, data=seg[:10])[0] == S_IOERR  # partial segment
    assert request(mem, q, dev, T_DISCARD, 0, data=struct.pack("<QII", 0, 1, 1))[0] == S_IOERR  # unmap flag
    assert os.path.getsize(image) == SECTORS * 512
    blk.close()


def test_readonly(mem, image):
    before = image.read_bytes()
    blk, dev, drv, q = start(mem, DriveSpec(str(image), readonly=True))
    assert drv.device_features() & VIRTIO_BLK_F_RO
    assert request(mem, q, dev, T_OUT, 0, data=b"x" * 512)[0] == S_IOERR
    assert request(mem, q, dev, T_WRITE_ZEROES, 0, data=struct.pack("<QII", 0, 1, 0))[0] == S_UNSUPP
    assert request(mem, q, dev, T_IN, 0, in_len=512)[0] == S_OK
    assert image.read_bytes() == before
    other_reader = VirtioBlk(DriveSpec(str(image), readonly=True))  # shared locks coexist
    other_reader.close()
    blk.close()


def test_locking_and_missing_files(image, tmp_path):
    blk = VirtioBlk(DriveSpec(str(image)))
    with pytest.raises(DeviceError, match="in use"):
        VirtioBlk(DriveSpec(str(image)))
    with pytest.raises(DeviceError):
        VirtioBlk(DriveSpec(str(image), readonly=True))
    blk.close()
    VirtioBlk(DriveSpec(str(image))).close()
    with pytest.raises(ConfigError, match="No such file"):
        VirtioBlk(DriveSpec(str(tmp_path / "missing.img")))
    with pytest.raises(ConfigError, match="not a regular file or block device"):
        VirtioBlk(DriveSpec("/dev/null"))


def test_parse_drive_spec():
    assert parse_drive_spec("file=a.img") == DriveSpec("a.img")
    assert parse_drive_spec("file=/x/b.img,readonly=on,serial=abc") == DriveSpec("/x/b.img", True, "abc")
    assert parse_drive_spec("file=c.img,cache=none").cache == "none"
    for bad in ("file=a,cache=unsafe", "", "readonly=on", "file=a,readonly=maybe", "file=a,bogus=1", "a.img", "file=a,serial=" + "x" * 21,
                "file=a,format=qcow2"):
        with pytest.raises(ConfigError):
            parse_drive_spec(bad)


def test_state_round_trip(mem, image):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    request(mem, q, dev, T_IN, 0, in_len=512)
    s = dev.state()
    assert isinstance(s.device, BlkState)
    blk.close()
    blk2 = VirtioBlk(DriveSpec(str(image)))
    dev2 = VirtioPciDevice(blk2, mem)
    dev2.restore(s)
    assert dev2.state() == s
    s.device = BlkState(SECTORS + 1, False, "")
    with pytest.raises(StateError):
        dev2.restore(s)
    blk2.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rtype=st.sampled_from([T_IN, T_OUT, T_DISCARD, T_WRITE_ZEROES, 7]),
       sector=st.integers(0, 2**64 - 1) | st.integers(SECTORS - 4, SECTORS + 4) | st.just(2**55),
       nbytes=st.integers(0, 4096), hdr_len=st.integers(0, 20))
def test_hostile_requests_never_escape(mem, image, rtype, sector, nbytes, hdr_len):
    blk, dev, drv, q = start(mem, DriveSpec(str(image)))
    size_before = os.path.getsize(image)
    mem.write(HDR, struct.pack("<IIQ", rtype, 0, sector) + b"\x00" * 4)
    mem.write(STATUS, b"\xee\x55")
    mem.write(DATA + 4096, b"\x5a" * 16)
    segs = [(HDR, hdr_len, False)] if hdr_len else []
    segs += [(DATA, nbytes, rtype == T_IN)] if nbytes else []
    segs.append((STATUS, 1, True))
    q.add(segs)
    dev.handle_notify(0)
    used = q.used()
    assert len(used) == 1 or dev.status & STATUS_DEVICE_NEEDS_RESET
    assert mem.read(STATUS + 1, 1) == b"\x55" and mem.read(DATA + 4096, 16) == b"\x5a" * 16
    assert os.path.getsize(image) == size_before
    if sector + (nbytes + 511) // 512 > SECTORS and rtype in (T_IN, T_OUT) and hdr_len >= 16:
        assert mem.read(STATUS, 1)[0] == S_IOERR
    blk.close()
