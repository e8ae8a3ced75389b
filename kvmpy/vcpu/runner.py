"""One thread per vCPU running KVM_RUN (GIL released) with pause/resume/kick/stop from others.

Kicks use immediate_exit plus SIGUSR1 sent with pthread_kill to the vCPU thread: the signal
makes a KVM_RUN in progress return EINTR, immediate_exit covers the window where the thread is
in Python between runs. install_kick_signal() must run once in the main thread (it installs the
no-op handler; Python only allows that there).
"""
from __future__ import annotations

import enum
import functools
import errno
import logging
import signal
import threading
from dataclasses import dataclass
from typing import Callable

from kvmpy.devices.bus import Bus
from kvmpy.errors import KvmpyError, StateError
from kvmpy.ioctl import Vcpu
from kvmpy.ioctl._kvm import lib
from kvmpy import sandbox
from kvmpy.vcpu.dispatch import ExitDispatcher, Outcome

log = logging.getLogger(__name__)

KICK_SIGNAL = signal.SIGUSR1
_EINTR = -errno.EINTR  # as returned by kvmpy_run
# An AP parked in UNINITIALIZED returns EAGAIN from KVM_RUN once INIT/SIPI wake it: run again.
_EAGAIN = -errno.EAGAIN


class StopKind(str, enum.Enum):
    HALTED = "halted"
    SHUTDOWN = "shutdown"          # triple fault
    POWEROFF = "poweroff"          # a system event asked for power-off
    RESET = "reset"
    CRASH = "crash"
    EXIT_CODE = "exit-code"        # guest asked to exit (debug-exit device via request_exit)
    STOPPED = "stopped"            # stop() from the host side
    ERROR = "error"


@dataclass(frozen=True)
class StopReason:
    """Why a vCPU thread ended. `exit_code` is set for EXIT_CODE; `detail` is human text."""
    kind: StopKind
    detail: str = ""
    exit_code: int | None = None


_OUTCOME_KIND = {Outcome.HALT: StopKind.HALTED, Outcome.SHUTDOWN: StopKind.SHUTDOWN,
                 Outcome.RESET: StopKind.RESET, Outcome.CRASH: StopKind.CRASH,
                 Outcome.POWEROFF: StopKind.POWEROFF}

# Hook: called on an outcome that would end the thread; return True to keep running (e.g. the
# composer reset the vCPU), False to stop with that reason.
StopHook = Callable[["VcpuThread", StopReason], bool]


def install_kick_signal() -> None:
    """Install the no-op kick handler; call from the main thread before starting vCPUs."""
    if threading.current_thread() is not threading.main_thread():
        raise StateError("installing the vCPU kick signal", detail="must be called from the main thread")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThread:
    """Runs one vCPU on its own thread, dispatching exits to the two buses."""

    def __init__(self, vcpu: Vcpu, pio_bus: Bus, mmio_bus: Bus, on_stop: StopHook | None = None,
                 name: str | None = None, fastpio: object | None = None):
        self.vcpu = vcpu
        self.fastpio = fastpio  # a `struct kvmpy_fastpio *` shared by all vCPUs, or None
        self.dispatcher = ExitDispatcher(vcpu.run_map, pio_bus, mmio_bus)
        self.on_stop = on_stop
        self.reason: StopReason | None = None
        self.kicks = 0
        self._cond = threading.Condition()
        self._pause_requested = False
        self._paused = False
        self._stop_requested: StopReason | None = None
        self._thread = threading.Thread(target=self._main, name=name or f"vcpu{vcpu.id}", daemon=True)
        self.sandbox = sandbox.inherited()   # the building thread's machine policy (kvmpy.sandbox)

    # -- control from other threads ---------------------------------------------------------
    def start(self, paused: bool = False) -> None:
        """Start the thread; `paused` parks it before the first guest instruction (QEMU's -S,
        or a restored vCPU waiting for the rest of the machine)."""
        if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            raise StateError(f"starting {self._thread.name}",
                             detail="call kvmpy.vcpu.runner.install_kick_signal() in the main thread first")
        if paused:
            with self._cond:
                self._pause_requested = True
            self.vcpu.run_struct.immediate_exit = 1   # KVM_RUN returns at once: park
        self._thread.start()

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN once (it then re-checks pause/stop requests)."""
        self.vcpu.run_struct.immediate_exit = 1
        ident = self._thread.ident
        if ident is not None and self._thread.is_alive():
            try:
                signal.pthread_kill(ident, KICK_SIGNAL)
            except ProcessLookupError:
                pass  # the thread just ended

    def pause(self, timeout: float | None = 5.0) -> bool:
        """Stop running guest code and wait until the thread is parked. True when parked (or the
        thread already ended)."""
        self.request_pause()
        return self.wait_parked(timeout)

    def request_pause(self) -> None:
        """Ask the thread to park and kick it out of KVM_RUN; does not wait (pause all vCPUs
        at once, then wait for each)."""
        with self._cond:
            self._pause_requested = True
        self.kick()

    def wait_parked(self, timeout: float | None = 5.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._paused or self.reason is not None
                                       or self._thread.ident is None, timeout)

    def resume(self) -> None:
        with self._cond:
            self._pause_requested = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def native_id(self) -> int | None:
        """The host thread id (QMP query-cpus-fast's thread-id), once started."""
        return self._thread.native_id

    def request_exit(self, exit_code: int, detail: str = "guest requested exit") -> None:
        """End the thread with EXIT_CODE (safe from the vCPU thread itself, e.g. a debug-exit
        device's write handler)."""
        self._request_stop(StopReason(StopKind.EXIT_CODE, detail, exit_code))

    def stop(self, timeout: float | None = 5.0) -> StopReason | None:
        """Stop the vCPU and join its thread; returns the stop reason."""
        self._request_stop(StopReason(StopKind.STOPPED, "stopped by the host"))
        if self._thread.ident is not None and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return self.reason

    def join(self, timeout: float | None = None) -> StopReason | None:
        self._thread.join(timeout)
        return self.reason

    def is_current(self) -> bool:
        """True when called on this vCPU's own thread (e.g. from a device's write handler)."""
        return threading.current_thread() is self._thread

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _request_stop(self, reason: StopReason) -> None:
        with self._cond:
            if self._stop_requested is None:
                self._stop_requested = reason
            self._cond.notify_all()
        if threading.current_thread() is self._thread:
            self.vcpu.run_struct.immediate_exit = 1
        else:
            self.kick()

    # -- the vCPU thread --------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.reason = self._loop()
        except KvmpyError as e:
            self.reason = StopReason(StopKind.ERROR, str(e))
        except Exception as e:  # a device bug must not vanish silently with the thread
            log.exception("vCPU %d: unexpected error", self.vcpu.id)
            self.reason = StopReason(StopKind.ERROR, f"{type(e).__name__}: {e}")
        if self.reason.kind == StopKind.ERROR and self.on_stop is not None:
            self.on_stop(self, self.reason)  # tell the composer: it must not wait for this vCPU
        with self._cond:
            self._paused = False
            self._cond.notify_all()
        log.debug("vCPU %d ended: %s", self.vcpu.id, self.reason)

    def _loop(self) -> StopReason:
        sandbox.enter("vcpu", self.sandbox, f"kvmpy-vcpu{self.vcpu.id}")
        fd = self.vcpu.fd
        # Bound once: each KVM_RUN is then a single C-level call, no Python frame in between.
        if self.fastpio is not None:
            kvm_run = functools.partial(lib.kvmpy_run_fast, fd, self.vcpu.run_struct,
                                        len(self.vcpu.run_map), self.fastpio)
        else:
            kvm_run = functools.partial(lib.kvmpy_run, fd)
        dispatch = self.dispatcher.dispatch
        run_struct = self.vcpu.run_struct
        while True:
            ret = kvm_run()
            if ret >= 0:
                outcome = dispatch()
                if not outcome:
                    continue
            elif ret == _EINTR:
                outcome = Outcome.INTERRUPTED
            elif ret == _EAGAIN:
                continue
            else:
                raise_ioctl(ret, self.vcpu.label)
            if outcome == Outcome.INTERRUPTED:
                run_struct.immediate_exit = 0
                self.kicks += 1
                reason = self._service_requests()
                if reason is not None:
                    return reason
                continue
            reason = self._stop_reason(outcome)
            if self.on_stop is not None and self.on_stop(self, reason):
                continue
            return reason

    def _service_requests(self) -> StopReason | None:
        """After a kick: honour stop, then park while paused."""
        with self._cond:
            while True:
                if self._stop_requested is not None:
                    return self._stop_requested
                if not self._pause_requested:
                    self._paused = False
                    return None
                if not self._paused:
                    self._paused = True
                    self._cond.notify_all()
                self._cond.wait()

    def _stop_reason(self, outcome: int) -> StopReason:
        detail = self.dispatcher.detail
        if self._stop_requested is not None:
            return self._stop_requested
        kind = _OUTCOME_KIND.get(Outcome(outcome), StopKind.ERROR)
        return StopReason(kind, detail)


def raise_ioctl(ret: int, label: str) -> None:
    from kvmpy.errors import IoctlError
    raise IoctlError(f"KVM_RUN on {label}", errno=-ret)
