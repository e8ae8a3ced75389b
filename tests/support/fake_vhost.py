"""A recording stand-in for kvmpy.vhost.net.VhostNet (no /dev/vhost-net needed): every ioctl
wrapper called on it is appended to the class's `log` as (name, *args), so a test can compare the
sequence VhostNetOffload issues. Shared by the offload's and the dirty log's tier-0 tests."""
from __future__ import annotations

from typing import Callable


def recording_vhost(features: int, vring_base: Callable[[int], int]) -> type:
    """A fresh VhostNet stand-in class offering `features` and answering GET_VRING_BASE with
    vring_base(queue); tests reset `cls.log` (and may patch `cls.features`) between steps."""

    class RecordingVhost:
        log: list = []

        def __init__(self, path: str):
            self.path = path

        def __getattr__(self, name: str) -> Callable[..., object]:
            def call(*args: object) -> object:
                cls.log.append((name, *args))
                if name == "get_features":
                    return cls.features
                if name == "get_vring_base":
                    return vring_base(args[0])
                return None
            return call

    cls = RecordingVhost
    cls.features = features
    return cls
