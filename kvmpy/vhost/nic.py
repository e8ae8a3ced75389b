"""One `--nic tap,...` made real: the TAP, the virtio-net backend on it, and (vhost=on|auto) the
vhost-net offload. The composer's VIRTIO_BACKENDS row calls `make_nic`; the wiring then binds
the offload to the function's notify ioeventfds and MSI-X irqfds."""
from __future__ import annotations

import logging
from typing import Any, Callable

from kvmpy.devices.virtio.net import VirtioNet
from kvmpy.devices.virtio.netspec import NicSpec
from kvmpy.errors import KvmpyError
from kvmpy.vhost.net import VHOST_NET_PATH, VhostNetOffload
from kvmpy.vhost.tap import Tap

log = logging.getLogger(__name__)


def make_nic(spec: NicSpec, call_later: Callable[..., Any] | None = None,
             vhost_path: str = VHOST_NET_PATH, tap: Tap | None = None, close_tap: bool = True) -> VirtioNet:
    """The TAP (or `tap`, one the machine kept from an earlier boot) and a VirtioNet on it;
    raises DeviceError (one line) when the TAP cannot be had or vhost=on cannot open
    /dev/vhost-net. vhost=auto falls back to userspace with one log line. `close_tap=False`:
    the NIC's close leaves the TAP to its owner (the machine, across reboots)."""
    given = tap is not None
    tap = tap if tap is not None else Tap(spec.ifname, spec.queues, spec.bridge)
    offload = None
    try:
        if spec.vhost != "off":
            try:
                offload = VhostNetOffload(tap.fds, vhost_path)
            except KvmpyError as e:
                if spec.vhost == "on":
                    raise
                log.warning("%s: vhost-net unavailable (%s): packets go through userspace", tap.ifname, e)
        nic = VirtioNet(tap, spec.mac_bytes(), queue_pairs=spec.queues, call_later=call_later, offload=offload)
        nic.close_backend = close_tap
        return nic
    except BaseException:
        if offload is not None:
            offload.close()
        if not given:           # made here and never handed out
            tap.close()
        raise
