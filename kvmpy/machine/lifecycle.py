"""The machine: one guest's lifecycle over a Board, with QMP's run states, callable from any thread.

    m = Machine(config)          # or Machine(kernel="bzImage", memory="512M", rng=True)
    m.start()                    # non-blocking; start(paused=True) is QEMU's -S
    m.pause(); m.resume()        # pause() returns with every vCPU parked and the I/O loop held
    m.reset(); m.powerdown()     # system_reset; the ACPI power button
    m.save("file:/tmp/vm")       # the whole state, then postmigrate (kvmpy.machine.snapshot)
    m.stop(); m.wait()           # end it; wait for the end -> MachineExit

A supervisor thread ("kvmpy-machine") turns what vCPU and device threads report (reset, poweroff,
panic, failure) into run-state changes and events, rebuilds the Board on reboots (over the same
guest RAM and consoles, so what API users hold stays valid), and enforces --timeout. Device and
vCPU threads never take the machine's lock: they record and wake the supervisor, so pause() can
wait for a vCPU that is reporting something without a deadlock. Signals belong to the CLI.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any, Callable

from kvmpy import sandbox
from kvmpy.devices.console import Console
from kvmpy.errors import StateError
from kvmpy.ioctl import Kvm
from kvmpy.machine.board import Board, BoardHooks
from kvmpy.machine.config import MachineConfig
from kvmpy.machine.console import LateTarget, console_for
from kvmpy.machine.api import MachineApiMixin
from kvmpy.machine.control import MachineControlMixin
from kvmpy.machine.panicwatch import PanicWatch
from kvmpy.machine.runstate import RESUMABLE, MachineExit, RunState
from kvmpy.memslots import GuestMemory
from kvmpy.vcpu.runner import KICK_SIGNAL, StopKind, StopReason, VcpuThread, install_kick_signal

log = logging.getLogger(__name__)

Listener = Callable[[str, dict], None]
# QMP SHUTDOWN reasons (qapi/run-state.json ShutdownCause)
GUEST_SHUTDOWN, GUEST_RESET, GUEST_PANIC = "guest-shutdown", "guest-reset", "guest-panic"


class Machine(MachineApiMixin, MachineControlMixin):
    def __init__(self, config: MachineConfig | None = None, *, serial: Console | None = None,
                 virtio_console: Console | None = None, **kwargs: Any):
        if config is None:
            config = MachineConfig.from_kwargs(**kwargs)
        elif kwargs:
            raise TypeError(f"Machine(): keyword arguments {sorted(kwargs)} given with a MachineConfig")
        config.validate()
        self.config = config
        self.name = config.name
        self.confinement = sandbox.confinement(config.sandbox, config.runas, config.chroot)
        sandbox.adopt(self.confinement.policy)   # threads built from here on inherit it
        self.jail_paths: list[str] = []         # unix sockets bound outside (QMP): handed to --runas
        self.kvm = Kvm(config.device)
        self.serial_console = serial if serial is not None else console_for(config.serial)
        self.hvc_console = virtio_console
        self.taps: dict = {}            # --nic TAPs by index: made by the first board, kept across reboots
        if self.hvc_console is None and config.virtio_console:
            self.hvc_console = console_for(config.virtio_console)
        self.panic = PanicWatch(self.serial_console.write)
        self.memory: GuestMemory | None = None
        self.board: Board | None = None
        self.boots = 0
        self.stats_text = ""                    # --stats: exit counts of the last board
        self._status = RunState.INMIGRATE if config.incoming else RunState.PRELAUNCH
        self._lock = threading.RLock()          # serialises transitions (never taken by vCPU threads)
        self._flags = threading.Lock()          # guards what vCPU/device threads report
        self.monitor_gate = threading.Lock()    # QMP commands run under it; a switchover holds it
        self._wake = threading.Event()
        self._ended = threading.Event()
        self._end: MachineExit | None = None
        self._reset_pending: bool | None = None  # None, or "was the guest the cause"
        self._report_requested = False
        self._listeners: list[Listener] = []
        self._port_hooks: list[tuple] = []      # (bus, base, length, HookDevice)
        self.last_migration: dict[str, Any] | None = None
        self._init_control()
        self._supervisor: threading.Thread | None = None
        self._starting = False                  # start() is building the first board
        self._deadline: float | None = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
            install_kick_signal()

    # -- the API users see -----------------------------------------------------------------------
    @property
    def status(self) -> str:
        """The QMP run state ("running", "paused", ...)."""
        return self._status.value

    @property
    def run_state(self) -> RunState:
        return self._status

    def add_listener(self, fn: Listener) -> None:
        """`fn(event, data)` for QMP's events (STOP, RESUME, RESET, POWERDOWN, SHUTDOWN,
        GUEST_PANICKED, MIGRATION...). Called on machine threads: it must not block."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Listener) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def emit(self, event: str, data: dict | None = None) -> None:
        for fn in list(self._listeners):
            try:
                fn(event, dict(data or {}))
            except Exception:  # a listener's bug must not change the machine's fate
                log.exception("event listener failed on %s", event)

    # -- transitions -----------------------------------------------------------------------------
    def start(self, paused: bool | None = None, unless_started: bool = False) -> None:
        """Build the machine and let it run (or, paused / -S, stay in prelaunch with every vCPU
        parked until resume()). Returns at once; wait() waits for the end.

        `unless_started`: nothing to do when the machine is built already. The CLI's own start
        says so: its monitors listen first, and a QMP `cont` that arrives before it builds the
        machine and runs it then (as QEMU's does, `cont` answers once the guest runs)."""
        paused = self.config.paused if paused is None else paused
        with self._lock:
            if unless_started and self.board is not None:
                return
            if self.board is not None and self._status is RunState.PRELAUNCH:
                self.resume()    # built with -S: QMP cont
                return
            if self.board is not None or self._status is not RunState.PRELAUNCH:
                raise StateError("starting the machine", detail=f"it is {self.status}")
            self.memory = GuestMemory.create(self.config.memory, self.config.mem_backend)
            # a stop() from a signal handler on this thread, while the board is being built, is
            # only recorded: tearing the board down under _new_board would leave it None there
            self._starting = True
            try:
                self._new_board(load=True, paused=paused)
                self._set_status(RunState.PRELAUNCH if paused else RunState.RUNNING)
                self._start_supervisor()   # it finds a stop recorded meanwhile and ends the machine
            finally:
                self._starting = False

    def pause(self) -> None:
        """QMP stop. Inmigrate: the restored guest stays paused (QEMU's autostart off). Not built
        yet without -S (the CLI's monitors listen before its start): built parked and stopped, as
        QEMU's `stop` (served only once its guest runs) always leaves it."""
        with self._lock:
            if self._status is RunState.INMIGRATE:
                self.config.paused = True
            elif self._status is RunState.PRELAUNCH and self.board is None and not self.config.paused:
                self.start(paused=True)
                self._set_status(RunState.PAUSED)
                self.emit("STOP")
            elif self._status is RunState.RUNNING:
                self.board.pause()
                self._set_status(RunState.PAUSED)
                self.emit("STOP")
            elif self._status.ended:
                raise StateError("pausing the machine", detail=f"it has ended ({self.status})")

    def resume(self) -> None:
        """Run again (QMP cont). In inmigrate, the restored guest will run once the stream is
        in (QEMU's autostart), even with -S."""
        with self._lock:
            if self._status is RunState.INMIGRATE:
                self.config.paused = False
                return
            if self._status in RESUMABLE and self.board is not None:
                self.board.resume()
                self._set_status(RunState.RUNNING)
                self.emit("RESUME")
            elif self._status is not RunState.RUNNING:
                raise StateError("resuming the machine", detail=f"it is {self.status}")

    def reset(self) -> None:
        """System reset (QMP system_reset): rebuild over the same RAM; a paused machine stays paused."""
        self._request_reset(guest=False)

    def powerdown(self) -> None:
        """Press the ACPI power button: the guest decides to shut itself down (or not)."""
        board = self.board
        if board is None:
            raise StateError("pressing the power button", detail=f"the machine is {self.status}: not built yet")
        pm = board.acpi_pm
        if pm is None or not hasattr(pm, "press_power_button"):
            raise StateError("pressing the power button", detail="the machine has no ACPI (--no-acpi)")
        pm.press_power_button()
        self.emit("POWERDOWN")

    def stop(self, reason: str = "stopped by the host", status: int = 0) -> None:
        """End the machine (QMP quit). Returns at once; wait() for the end."""
        self.finish(MachineExit(status, reason, guest=False))
        if self._supervisor is None and not self._starting:
            self._finish_now()

    def wait(self, timeout: float | None = None) -> MachineExit | None:
        """Block until the machine has ended; its MachineExit, or None on timeout."""
        if not self._ended.wait(timeout):
            return None
        return self._end

    def run(self) -> MachineExit:
        """start() then wait(): the CLI's and simple scripts' way (Ctrl-C: the caller's)."""
        if self._status is RunState.PRELAUNCH and self.board is None:
            self.start()
        return self.wait()      # no polling: a signal handler still runs (and may raise) meanwhile

    def request_report(self) -> None:
        """Ask the supervisor for a state report on stderr (the CLI's SIGUSR2)."""
        self._report_requested = True
        self._wake.set()

    # -- reports from device and vCPU threads (no machine lock taken) ---------------------------
    def finish(self, end: MachineExit) -> None:
        """Record how the machine ended (first caller wins) and wake the supervisor."""
        with self._flags:
            if self._end is None:
                self._end = end
        self._wake.set()

    def _request_reset(self, guest: bool) -> None:
        if guest and (self.config.no_reboot or self.panic.line is not None):
            self._guest_end_on_reboot()
        else:
            with self._flags:
                if self._reset_pending is None:
                    self._reset_pending = guest
            self._wake.set()
        if self.board is not None:
            self.board.stop_current_vcpu()

    def _guest_end_on_reboot(self) -> None:
        if self.panic.line is not None:
            self.finish(MachineExit(2, f"guest kernel panic: {self.panic.line}", True, RunState.GUEST_PANICKED))
        else:
            self.finish(MachineExit(0, "guest rebooted (--no-reboot)"))

    def _hooks(self) -> BoardHooks:
        def poweroff() -> None:
            self.finish(MachineExit(0, "guest powered off"))
            self.board.stop_current_vcpu()

        def debug_exit(code: int) -> None:
            self.finish(MachineExit(code & 0xFF, f"guest wrote debug-exit code {code}"))
            self.board.stop_current_vcpu()
        return BoardHooks(reset=lambda: self._request_reset(guest=True), poweroff=poweroff,
                          debug_exit=debug_exit, vcpu_stopped=self._on_vcpu_stop, serial_out=self.panic.write)

    def _on_vcpu_stop(self, thread: VcpuThread, reason: StopReason) -> bool:
        kind, vid = reason.kind, thread.vcpu.id
        if kind == StopKind.RESET:
            self._request_reset(guest=True)
        elif kind == StopKind.POWEROFF:
            self.finish(MachineExit(0, "guest powered off"))
        elif kind == StopKind.SHUTDOWN:
            if self.panic.line is not None:
                self._guest_end_on_reboot()
            else:
                self.finish(MachineExit(3, f"guest triple fault on vCPU {vid}"
                                           + (f": {reason.detail}" if reason.detail else "")))
        elif kind == StopKind.CRASH:
            self.finish(MachineExit(2, f"guest reported a crash: {reason.detail}", True, RunState.GUEST_PANICKED))
        elif kind == StopKind.EXIT_CODE:
            self.finish(MachineExit(reason.exit_code or 0, reason.detail))
        elif kind == StopKind.HALTED:
            # Without a pending interrupt source a halted uniprocessor never wakes: say so.
            self.finish(MachineExit(0, f"vCPU {vid} halted"))
        elif kind != StopKind.STOPPED:
            self.finish(MachineExit(4, f"vCPU {vid} failed: {reason.detail}", True, RunState.INTERNAL_ERROR))
        return False

    # -- the supervisor ---------------------------------------------------------------------------
    def _start_supervisor(self) -> None:
        if self.config.timeout:
            self._deadline = time.monotonic() + self.config.timeout
        self._supervisor = threading.Thread(target=self._supervise, name="kvmpy-machine", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        try:
            sandbox.enter("machine", self.confinement.policy)
            while not self._ended.is_set():
                # woken by whatever it acts on (an end, a reset, a report) and by nothing else: each
                # idle wakeup took the guest's CPU in L1 (ms of Python a time, as steal in the guest)
                deadline = self._deadline
                self._wake.wait(None if deadline is None else max(deadline - time.monotonic(), 0.0) + 0.01)
                self._wake.clear()
                if self._report_requested:
                    self._report_requested = False
                    with self._lock:
                        if self.board is not None:
                            self.board.write_report(sys.stderr, self.boots)
                if self._deadline is not None and time.monotonic() > self._deadline:
                    self.finish(MachineExit(124, f"timed out after {self.config.timeout:g} s", guest=False))
                with self._flags:
                    end, reset, self._reset_pending = self._end, self._reset_pending, None
                if end is not None:
                    self._finish_now()
                elif reset is not None:
                    self._rebuild(guest=reset)
        except BaseException as e:  # never leave waiters hanging on a dead supervisor
            log.exception("machine supervisor failed")
            self.finish(MachineExit(4, f"internal error: {type(e).__name__}: {e}", False, RunState.INTERNAL_ERROR))
            self._finish_now()

    def _rebuild(self, guest: bool) -> None:
        with self._lock:
            if self.board is None or self._status.ended:
                return
            if self.confinement.jailed:
                self.finish(MachineExit(0, sandbox.JAILED_REBOOT, guest))
                return
            if self.config.kernel is None:   # restored with --incoming and no --kernel
                self.finish(MachineExit(1, "the guest rebooted, but there is no kernel to boot: give the "
                                           "destination the source's --kernel/--initrd/--append too", guest))
                return
            paused = self._status is not RunState.RUNNING
            log.info("%s reset: rebuilding the machine", "guest" if guest else "host")
            self._board_closing("the guest rebooted" if guest else "the machine was reset (system_reset)")
            self.board.close()
            self.board = None
            self._new_board(load=True, paused=paused)
            self.emit("RESET", {"guest": guest, "reason": GUEST_RESET if guest else "host-qmp-system-reset"})

    def _finish_now(self) -> None:
        """Tear the board down and publish the end (status, SHUTDOWN event, wait() returns)."""
        with self._lock:
            if self._ended.is_set():
                return
            end = self._end or MachineExit(4, "machine stopped for no recorded reason", False, RunState.INTERNAL_ERROR)
            if self.board is not None:
                if self.config.stats:
                    self.stats_text = self.board.stats_report()
                self._board_closing(f"the machine ended ({end.reason})")
                self.board.close()
                self.board = None
            self._set_status(end.run_state)
            if end.run_state is RunState.GUEST_PANICKED:
                self.emit("GUEST_PANICKED", {"action": "poweroff"})
            cause = (GUEST_PANIC if end.run_state is RunState.GUEST_PANICKED else
                     GUEST_RESET if "reboot" in end.reason or "triple fault" in end.reason else
                     GUEST_SHUTDOWN) if end.guest else "host-qmp-quit"
            self.emit("SHUTDOWN", {"guest": end.guest, "reason": cause})
            self._ended.set()

    # -- building -----------------------------------------------------------------------------------
    def _new_board(self, load: bool, paused: bool, cpuid: list | None = None) -> Board:
        sandbox.adopt(self.confinement.policy)   # this machine's, whichever machine this thread built last
        self.boots += 1
        self.board = Board(self.kvm, self.config, self.memory, self._hooks(), self.hvc_console,
                           load=load, cpuid=cpuid, taps=self.taps)
        try:
            self._apply_port_hooks()        # a hook on a device's ports is refused here, by name
        except BaseException:
            self.board.close()
            self.board = None
            raise
        if load:
            self._open_consoles()   # outputs last: after the kernel, images and devices are in
            self.board.start(paused=paused)
            log.info("boot %d: %d vCPU(s) %s", self.boots, self.config.smp, "parked" if paused else "running")
        return self.board

    def _open_consoles(self) -> None:
        """Open the consoles (truncate the log files, bind the sockets: nothing before every
        check passed) once; they deliver input to whichever board's UART / virtio console exists now."""
        if getattr(self, "_consoles_open", False):
            return
        self._consoles_open = True
        for console in filter(None, (self.serial_console, self.hvc_console)):
            console.open()      # before the reader threads start, filtered (sandbox kind "console")

        def hvc():
            entry = self.board.devices.get("virtio-console0") if self.board is not None else None
            return entry.device.device if entry is not None else None
        sandbox.start_filtered("console", self.confinement.policy, lambda: (
            self.serial_console.start(LateTarget(lambda: self.board and self.board.devices["com1"].device),
                                      on_quit=lambda: self.finish(MachineExit(0, "quit from the console", guest=False))),
            self.hvc_console and self.hvc_console.start(
                LateTarget(hvc), on_quit=lambda: self.finish(MachineExit(0, "quit", guest=False)))))
        from kvmpy.machine.checks import console_outputs
        self._remove_outside = sandbox.confine(self.confinement, self.jail_paths + [
            path for _, kind, path in console_outputs(self.config.serial, self.config.virtio_console) if kind == "unix"])

    def _set_status(self, status: RunState) -> None:
        if status is not self._status:
            log.debug("run state: %s -> %s", self._status.value, status.value)
            self._status = status

    # -- the end -------------------------------------------------------------------------------------
    def close(self) -> None:
        """End the machine if it still runs and free everything (RAM, consoles, /dev/kvm)."""
        try:
            if not self._ended.is_set():
                self.stop()
                if self._supervisor is not None and self._supervisor is not threading.current_thread():
                    self._supervisor.join(10)
                self._finish_now()
        finally:
            if self.memory is not None:
                self.memory.close()
                self.memory = None
            self.serial_console.close()
            if self.hvc_console is not None:
                self.hvc_console.close()
            for tap in self.taps.values():
                tap.close()
            self.taps.clear()
            self.kvm.close()
            getattr(self, "_remove_outside", lambda: None)()   # --chroot: sockets bound outside DIR

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

