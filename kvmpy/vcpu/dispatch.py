"""Exit dispatch: one kvm_run exit -> a call on the port-I/O or MMIO bus, or an outcome the
runner acts on. Pure: it sees a writable kvm_run buffer and two buses, never the vCPU fd, so
tier-0 tests drive it with a cffi-allocated struct kvm_run.

This is the exit path: the header is decoded with precompiled struct unpackers at compiler-given
offsets, bound methods are looked up once, and nothing is allocated beyond the data bytes the
bus API hands to devices.
"""
from __future__ import annotations

import enum
import logging
import struct
from typing import Any

from kvmpy.devices.bus import Bus
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.ioctl._kvm import ffi, lib

log = logging.getLogger(__name__)


class Outcome(enum.IntEnum):
    """What the runner should do after an exit. CONTINUE is 0 so `if outcome:` means stop-ish."""
    CONTINUE = 0
    HALT = 1
    SHUTDOWN = 2           # triple fault (KVM_EXIT_SHUTDOWN)
    RESET = 3
    CRASH = 4
    INTERRUPTED = 5        # EINTR / immediate_exit: check pause/stop requests
    FAIL_ENTRY = 6
    INTERNAL_ERROR = 7
    DEBUG = 8
    UNHANDLED = 9
    POWEROFF = 10          # KVM_SYSTEM_EVENT_SHUTDOWN: the guest asked to power off


_OFF_REASON = ffi.offsetof("struct kvm_run", "exit_reason")
_OFF_IO = ffi.offsetof("struct kvm_run", "io")
_OFF_MMIO = ffi.offsetof("struct kvm_run", "mmio")
_OFF_MMIO_DATA = ffi.offsetof("struct kvm_run", "mmio", "data")
_OFF_SYSEV = ffi.offsetof("struct kvm_run", "system_event")
_OFF_INTERNAL = ffi.offsetof("struct kvm_run", "internal")
_OFF_FAIL = ffi.offsetof("struct kvm_run", "fail_entry")

# struct layouts as the compiler sees them: io = u8 direction, u8 size, u16 port, u32 count,
# u64 data_offset; mmio = u64 phys_addr, u8 data[8], u32 len, u8 is_write.
_IO_FMT = struct.Struct("=BBHIQ")
# exit_reason and the io member in one unpack: the common exit costs a single call.
_REASON_IO_FMT = struct.Struct(f"=I{_OFF_IO - _OFF_REASON - 4}xBBHIQ")
_MMIO_FMT = struct.Struct("=Q8sIB")
_U32 = struct.Struct("=I")
_U32x2 = struct.Struct("=II")
_FAIL_FMT = struct.Struct("=QI")
assert ffi.offsetof("struct kvm_run", "mmio", "len") - _OFF_MMIO == 16
assert ffi.offsetof("struct kvm_run", "io", "data_offset") - _OFF_IO == 8

EXIT_IO = lib.KVM_EXIT_IO
EXIT_MMIO = lib.KVM_EXIT_MMIO
EXIT_HLT = lib.KVM_EXIT_HLT
EXIT_IO_OUT = lib.KVM_EXIT_IO_OUT
_SYSTEM_EVENTS = {lib.KVM_SYSTEM_EVENT_SHUTDOWN: Outcome.POWEROFF,
                  lib.KVM_SYSTEM_EVENT_RESET: Outcome.RESET,
                  lib.KVM_SYSTEM_EVENT_CRASH: Outcome.CRASH}
_VALID_SIZES = (1, 2, 4)


class ExitDispatcher:
    """Decodes the exit in `run_buffer` (kvm_run bytes, writable) and performs it on the buses.

    After a non-CONTINUE outcome, `detail` says why (for logs and the runner's stop reason).
    """

    def __init__(self, run_buffer: Any, pio_bus: Bus, mmio_bus: Bus):
        self.buf = run_buffer
        self.buf_len = len(run_buffer)
        self.pio_read = pio_bus.read
        self.pio_write = pio_bus.write
        self.mmio_read = mmio_bus.read
        self.mmio_write = mmio_bus.write
        self.detail = ""
        self.exits = 0
        self.bad_exits = 0
        self._ratelog = RateLimitedLog(log)
        self._unpack_reason_io = _REASON_IO_FMT.unpack_from
        self._unpack_io = _IO_FMT.unpack_from
        self._unpack_mmio = _MMIO_FMT.unpack_from

    def dispatch(self) -> int:
        """Handle the current exit; returns an Outcome (an int, CONTINUE == 0)."""
        buf = self.buf
        self.exits += 1
        reason, direction, size, port, count, off = self._unpack_reason_io(buf, _OFF_REASON)
        if reason == EXIT_IO:
            if count == 1 and direction == EXIT_IO_OUT and size in _VALID_SIZES \
                    and off + size <= self.buf_len:
                self.pio_write(port, buf[off:off + size])
                return 0
            return self._io_slow(direction, size, port, count, off)
        if reason == EXIT_MMIO:
            return self._mmio()
        return self._other(reason)

    def _io_slow(self, direction: int, size: int, port: int, count: int, off: int) -> int:
        """IN, and string (rep ins/outs) I/O with count > 1."""
        total = size * count
        if size not in _VALID_SIZES or count == 0 or off + total > self.buf_len or off < _OFF_IO:
            self.bad_exits += 1
            self._ratelog.warning("io", "malformed I/O exit: port=%#x size=%d count=%d offset=%d",
                                  port, size, count, off)
            return 0
        buf = self.buf
        if direction == EXIT_IO_OUT:
            write = self.pio_write
            for i in range(off, off + total, size):
                write(port, buf[i:i + size])
            return 0
        read = self.pio_read
        for i in range(off, off + total, size):
            buf[i:i + size] = _fit(read(port, size), size)
        return 0

    def _mmio(self) -> int:
        phys_addr, data, length, is_write = self._unpack_mmio(self.buf, _OFF_MMIO)
        if not 1 <= length <= 8:
            self.bad_exits += 1
            self._ratelog.warning("mmio", "malformed MMIO exit: addr=%#x len=%d", phys_addr, length)
            return 0
        if is_write:
            self.mmio_write(phys_addr, data[:length])
        else:
            self.buf[_OFF_MMIO_DATA:_OFF_MMIO_DATA + length] = _fit(self.mmio_read(phys_addr, length), length)
        return 0

    def _other(self, reason: int) -> int:
        buf = self.buf
        if reason == EXIT_HLT:
            self.detail = "guest executed HLT"
            return Outcome.HALT
        if reason == lib.KVM_EXIT_INTR:
            self.detail = "interrupted"
            return Outcome.INTERRUPTED
        if reason == lib.KVM_EXIT_IRQ_WINDOW_OPEN:
            return 0
        if reason == lib.KVM_EXIT_SHUTDOWN:
            self.detail = "guest shut down (triple fault)"
            return Outcome.SHUTDOWN
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            ev_type, ndata = _U32x2.unpack_from(buf, _OFF_SYSEV)
            outcome = _SYSTEM_EVENTS.get(ev_type)
            self.detail = f"system event {ev_type} (ndata={min(ndata, 16)})"
            if outcome is None:
                self._ratelog.warning("sysevent", "unhandled system event type %d", ev_type)
                return Outcome.UNHANDLED
            return outcome
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            hw_reason, cpu = _FAIL_FMT.unpack_from(buf, _OFF_FAIL)
            self.detail = f"VM entry failed: hardware reason {hw_reason:#x} on cpu {cpu}"
            return Outcome.FAIL_ENTRY
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            suberror, ndata = _U32x2.unpack_from(buf, _OFF_INTERNAL)
            words = struct.unpack_from(f"={min(ndata, 16)}Q", buf, _OFF_INTERNAL + 8)
            self.detail = f"KVM internal error: suberror {suberror}, data {[hex(w) for w in words]}"
            return Outcome.INTERNAL_ERROR
        if reason == lib.KVM_EXIT_DEBUG:
            self.detail = "debug exit"
            return Outcome.DEBUG
        self.detail = f"unhandled exit reason {reason}"
        self._ratelog.warning("exit", "%s", self.detail)
        return Outcome.UNHANDLED


def _fit(data: bytes, size: int) -> bytes:
    """A device answer of exactly `size` bytes (short answers padded with 0xff like a floating
    bus, long ones cut), so a buggy device cannot corrupt kvm_run."""
    n = len(data)
    if n == size:
        return data
    if n > size:
        return bytes(data[:size])
    return bytes(data) + b"\xff" * (size - n)
