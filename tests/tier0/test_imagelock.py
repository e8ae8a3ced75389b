"""Tier 0: a live migration's destination opens its disks without their locks, as QEMU's
incoming images stay inactive until the switchover, so a source that starts after it still
gets its images (tier 2 starts both at once; a destination that won the race once made the
source fail with "in use by another VM")."""
from __future__ import annotations

import fcntl
import os

import pytest

from kvmpy.devices.virtio.imagelock import ImageLock, lock_handover
from kvmpy.errors import DeviceError


def _image(tmp_path, name: str = "disk.img"):
    path = tmp_path / name
    path.write_bytes(bytes(4096))
    return str(path)


def test_a_destination_built_first_leaves_the_lock_to_the_source(tmp_path):
    path = _image(tmp_path)
    dest_fd, source_fd = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        with lock_handover():
            dest = ImageLock(dest_fd, False, path)
        assert dest.pending
        source = ImageLock(source_fd, False, path)          # starts: the image is free
        assert not source.pending
        with pytest.raises(DeviceError, match="still in use"):
            dest.take(0.05)
        source.unlock()                                     # the switchover
        dest.take(1.0)
        assert not dest.pending and source.pending
        with pytest.raises(OSError):                        # the destination holds it now
            fcntl.flock(os.open(path, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(dest_fd)
        os.close(source_fd)


def test_outside_a_handover_a_held_image_is_refused_and_read_only_images_share(tmp_path):
    path = _image(tmp_path)
    first, second, ro1 = (os.open(path, os.O_RDWR) for _ in range(3))
    try:
        ImageLock(first, False, path)
        with pytest.raises(DeviceError, match="in use by another VM"):
            ImageLock(second, False, path)
        with lock_handover():                               # a read-only disk waits for the writer
            assert ImageLock(ro1, True, path).pending
    finally:
        for fd in (first, second, ro1):
            os.close(fd)
    path2 = _image(tmp_path, "ro.img")
    a, b = os.open(path2, os.O_RDONLY), os.open(path2, os.O_RDONLY)
    try:
        with lock_handover():
            assert not ImageLock(a, True, path2).pending    # shared with the source's shared lock
        assert not ImageLock(b, True, path2).pending
    finally:
        os.close(a)
        os.close(b)
