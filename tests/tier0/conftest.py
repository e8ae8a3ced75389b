"""Tier-0 fixtures shared by the virtqueue and virtio-blk tests."""
import pytest

from kvmpy.devices.virtio import fastpath


@pytest.fixture(params=["python", "c"])
def datapath(request, monkeypatch):
    """Run the test on one data path: the pure-Python reference or the C one (fastpath.ENABLED),
    which must really be built."""
    if request.param == "c":
        assert fastpath.AVAILABLE, "kvmpy.ioctl._kvm lacks the C virtio data path: rebuild it (make venv)"
    monkeypatch.setattr(fastpath, "ENABLED", request.param == "c")
    return request.param
