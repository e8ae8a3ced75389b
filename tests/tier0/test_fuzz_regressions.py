"""Defects the coverage-guided fuzz targets (fuzz/) found, each kept as a fixed case."""
from __future__ import annotations

import pytest

import test_virtio_net_differential as net


@pytest.mark.parametrize("fast", [False, True], ids=["python", "c"])
def test_net_rx_fills_the_buffers_after_a_zero_length_one(fast):
    """fuzz/virtio_net.py: an rx chain whose first writable descriptor has length 0. The Python
    path stopped copying at it, yet returned the chain to the guest as holding the whole frame
    (the guest read stale memory as a packet); the C path skipped it. Both must skip it."""
    w = net.build(fast, 0)
    try:
        net.apply(w, ("rx", [(net.RXBUF, 0, True), (net.RXBUF + 0x1000, 1526, True)]))
        net.apply(w, ("send", 3, 200, 7))
        net.apply(w, ("readable",))
        assert w.seen[-1] == ("rx-used", [(0, 200)])
        frame = net.frame_bytes(3, 200, 7)
        got = w.mem.read(net.RXBUF + 0x1000, 200)
        assert got[:10] == frame[:10] and got[10:12] == b"\x01\x00" and got[12:] == frame[12:]
    finally:
        w.tap.dev_end.close()
        w.tap.host.close()
        w.mem.close()
