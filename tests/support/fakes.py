"""Small stand-ins the device tests and the fuzz targets share: an injected clock, an MSI sink
and a console sink that discard what they get."""
from __future__ import annotations


class Clock:
    """Seconds for the RTC, nanoseconds for the PM timer: one injected time for both."""

    def __init__(self) -> None:
        self.t = 1_710_083_045.25

    def __call__(self) -> float:
        return self.t

    def ns(self) -> int:
        return int(self.t * 1e9)


class MsiSink:
    def signal_msi(self, address: int, data: int) -> None:
        pass


class Sink:
    def write(self, data: bytes) -> None:
        pass
