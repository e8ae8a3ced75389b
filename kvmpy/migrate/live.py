"""Live migration over `tcp:HOST:PORT` and `unix:PATH`: a Machine as the pre-copy engine's
source (kvmpy.migrate.precopy), the connections, and the drives for block migration; the
destination's incoming path is kvmpy.migrate.incoming (incoming_live here calls it).

This sits above kvmpy.machine (it drives a Machine through its lifecycle methods and reuses
kvmpy.machine.snapshot's identity and state); Machine.migrate / Machine.incoming reach it with a
call-time import, so nothing below imports it at start-up.
With the `block` capability (kvmpy.migrate.block) the writable drives' images travel too: the
destination's images must exist with the same size, and be its own (see there).
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from kvmpy.errors import DeviceError, KvmpyError, MigrationError, StateError
from kvmpy.machine.runstate import RunState
from kvmpy.machine.snapshot import MachineState, _flush_disks, _ram_extents, identity_of
from kvmpy.memslots.dirty import DirtyTracker
from kvmpy.migrate.codec import encode_state
from kvmpy.migrate.precopy import Channel, Precopy
from kvmpy.migrate.uri import MigrationUri, parse_uri

if TYPE_CHECKING:
    from kvmpy.machine.lifecycle import Machine

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
ACCEPT_TIMEOUT_S = 600.0        # how long `--incoming tcp:`/`unix:` waits for the source
LIVE_SCHEMES = ("tcp", "unix")
DISK_LOCK_TIMEOUT_S = 5.0       # the destination's wait for a shared disk's lock after GO
THROTTLE_SLICE_S = 0.01         # auto-converge: vCPUs run this long between throttle pauses


# -- connections --------------------------------------------------------------------------------
def connect(uri: MigrationUri, timeout_s: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """The source's end: a connected socket to the destination."""
    context = f"connecting to {uri}"
    try:
        if uri.scheme == "tcp":
            return _no_delay(socket.create_connection((uri.host or "localhost", uri.port), timeout=timeout_s))
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout_s)
            sock.connect(uri.path)
        except BaseException:
            sock.close()
            raise
        return sock
    except socket.timeout:
        raise MigrationError(context, detail=f"no answer within {timeout_s:g} s") from None
    except OSError as exc:
        raise MigrationError(context, errno=exc.errno, detail="is the destination listening (--incoming)?") from None


def _no_delay(sock: socket.socket) -> socket.socket:
    """TCP_NODELAY: the stream's last small sections (STATE, END, SYNC) and the one-line replies
    must not wait for the peer's delayed ACK (Nagle): 40 ms or more of downtime each time."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def accept_one(uri: MigrationUri, timeout_s: float = ACCEPT_TIMEOUT_S,
               listening: Callable[[], None] | None = None) -> socket.socket:
    """The destination's end: listen on `uri`, accept one peer within `timeout_s`, stop listening.
    A unix: socket file is removed afterwards; an existing path that is not a socket is refused."""
    context = f"waiting for the migration on {uri}"
    try:
        if uri.scheme == "tcp":
            family = socket.AF_INET6 if ":" in uri.host else socket.AF_INET
            server = socket.create_server((uri.host, uri.port), family=family, backlog=1)
        else:
            try:
                if not stat.S_ISSOCK(os.lstat(uri.path).st_mode):
                    raise MigrationError(context, detail=f"{uri.path} exists and is not a socket")
                os.unlink(uri.path)             # a stale socket from an earlier run
            except FileNotFoundError:
                pass
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                server.bind(uri.path)
                server.listen(1)
            except BaseException:
                server.close()
                raise
    except OSError as exc:
        raise MigrationError(context, errno=exc.errno) from None
    try:
        if listening is not None:
            listening()
        server.settimeout(timeout_s)
        try:
            peer, address = server.accept()
        except socket.timeout:
            raise MigrationError(context, detail=f"no source connected within {timeout_s:g} s") from None
        except OSError as exc:
            raise MigrationError(context, errno=exc.errno) from None
        log.info("incoming migration from %s", address or "a unix: peer")
        return _no_delay(peer) if uri.scheme == "tcp" else peer
    finally:
        server.close()
        if uri.scheme == "unix":
            try:
                os.unlink(uri.path)
            except OSError:
                pass


# -- the source -----------------------------------------------------------------------------------
class MachineSource:
    """A running Machine as precopy.PrecopySource."""

    def __init__(self, machine: "Machine"):
        # Under the machine's lock, the one its close and its reboots hold while they notify the
        # board watchers and close the VM: either the board is gone already (refused here) or our
        # watcher hears of it before its fd closes. Without it, an API user who left
        # `with Machine(...)` right after migrate() had the tracker's first ioctl land on a
        # closed (or reused) VM fd: "KVM_SET_USER_MEMORY_REGION(slot 0) on vm6: ENOTTY".
        with machine._lock:
            if machine.board is None or machine.run_state not in (RunState.RUNNING, RunState.PAUSED):
                raise StateError("migrating", detail=f"the machine is {machine.status}")
            self._attach(machine)

    def _attach(self, machine: "Machine") -> None:
        self.machine, self.board, self.memory = machine, machine.board, machine.memory
        self.tracker = DirtyTracker(self.memory, self.board.vm)
        offloads = []
        for entry in self.board.devices:
            offload = getattr(getattr(entry.device, "device", None), "offload", None)
            if offload is None:
                continue
            if not callable(getattr(offload, "set_log", None)):
                raise MigrationError("migrating", detail=f"{entry.id}'s kernel data path cannot log its writes "
                                                         "into guest RAM; give it vhost=off")
            offloads.append(offload)
        if offloads:    # vhost-net writes guest RAM from the kernel, where neither KVM's log nor ours sees it
            from kvmpy.vhost.dirtylog import VhostDirtyLog
            self.tracker.extra_logs.append(VhostDirtyLog(offloads, self.memory.ranges))
        self.board_closed: str | None = None        # why the machine closed our board's VM
        machine.add_board_watcher(self._board_closing)
        self._paused_here = False
        self._throttle_pct = 0
        self._throttler: threading.Thread | None = None

    def throttle(self, percent: int) -> None:
        """auto-converge: keep every vCPU parked `percent` % of the time (0 stops it). A thread
        lets them run THROTTLE_SLICE_S, then parks them for the matching time, as QEMU's
        cpu_throttle does; only while the machine runs (the machine's lock is held per cycle,
        so a user's stop/cont is never undone)."""
        self._throttle_pct = max(0, min(int(percent), 99))
        if self._throttle_pct and self._throttler is None:
            self._throttler = threading.Thread(target=self._throttle_loop, name="kvmpy-throttle", daemon=True)
            self._throttler.start()
        elif not self._throttle_pct and self._throttler is not None:
            self._throttler.join()
            self._throttler = None

    def _throttle_loop(self) -> None:
        m = self.machine
        while (pct := self._throttle_pct):
            time.sleep(THROTTLE_SLICE_S)
            with m._lock:
                if m.run_state is not RunState.RUNNING or m.board is not self.board:
                    continue
                threads = self.board.vcpu_threads
                for t in threads:
                    t.request_pause()
                for t in threads:
                    t.wait_parked(1.0)
                time.sleep(THROTTLE_SLICE_S * pct / (100 - pct))
                for t in threads:
                    t.resume()

    def identity(self) -> bytes:
        return encode_state(identity_of(self.machine))

    def _board_closing(self, cause: str) -> None:
        """The machine is about to close our board's VM (a watcher: kvmpy.machine.control):
        the dirty log stops being read before the fd goes, and `check` names the cause."""
        if self.board_closed is None and self.machine.board is self.board:
            self.board_closed = cause
            self.tracker.detach(cause)

    def release(self) -> None:
        """The migration is over: stop watching the machine's board."""
        self.machine.remove_board_watcher(self._board_closing)

    def check(self) -> None:
        m = self.machine
        if self.board_closed is not None:
            if self.board_closed == "the guest rebooted":
                raise MigrationError("migrating", detail="the guest rebooted during the migration; start it again")
            raise MigrationError("migrating", detail=f"{self.board_closed} during the migration; "
                                                     "its VM closed under it")
        if m.board is not self.board:
            raise MigrationError("migrating", detail="the guest rebooted during the migration; start it again")
        if m.run_state.ended:
            raise MigrationError("migrating", detail=f"the machine ended ({m.status})")

    def pause(self) -> None:
        self.throttle(0)
        m = self.machine
        with m._lock:
            self.check()
            if m.run_state is RunState.RUNNING:
                m.pause()
                self._paused_here = True
            _flush_disks(m)

    def resume(self) -> None:
        self.throttle(0)
        if self._paused_here:
            self._paused_here = False
            try:
                self.machine.resume()
            except KvmpyError as exc:
                log.error("resuming after the failed migration: %s", exc)

    def state(self) -> bytes:
        b = self.board
        with self.machine._lock:        # the board cannot close (a `quit`, a timeout) meanwhile
            self.check()
            state = MachineState(b.vm_state(), b.vcpu_states(), b.devices.state())
        return encode_state(state)

    def completed(self) -> None:
        """Postmigrate, and the disks' locks handed to the destination (it takes them on GO)."""
        self.machine._set_status(RunState.POSTMIGRATE)
        for disk in _disks(self.board):
            disk.unlock()

    def extents(self) -> dict | None:
        return _ram_extents(self.memory)

    def block_disks(self) -> list["Drive"]:
        """The writable drives, for block migration (read-only ones are not copied)."""
        return [d for d in _drives(self.machine) if not d.readonly]

    def emit(self, event: str, data: dict) -> None:
        self.machine.emit(event, data)


def migrate_out(machine: "Machine", uri: str, on_engine: Callable[[Precopy], None] | None = None,
                capabilities: dict[str, bool] | None = None) -> dict[str, Any]:
    """Migrate `machine` live to `uri` (tcp:/unix:); the statistics, or raises with the machine
    running again as it was. `on_engine` receives the engine (for query-migrate and cancel);
    `capabilities` default to the machine's (migrate-set-capabilities)."""
    target = parse_uri(uri)
    if target.scheme not in LIVE_SCHEMES:
        raise MigrationError(f"migrating to {uri}", detail="live migration takes tcp:HOST:PORT or unix:PATH")
    source = MachineSource(machine)
    try:
        channel = Channel(connect(target))
    except BaseException:
        source.release()
        raise
    try:
        engine = Precopy(source, channel, dict(machine.migration_parameters),
                         capabilities=dict(machine.migration_capabilities if capabilities is None else capabilities),
                         monitor_gate=machine.monitor_gate)
        if on_engine is not None:
            on_engine(engine)
        stats = engine.run()
    finally:
        channel.close()
        source.release()
    machine.last_migration = stats
    return stats


def _disks(board: Any) -> list:
    """The board's disk backends that hold an image lock (VirtioBlk)."""
    return [b for b in (getattr(e.device, "device", None) for e in board.devices)
            if callable(getattr(b, "take_lock", None)) and callable(getattr(b, "unlock", None))]


class Drive:
    """A VirtioBlk as kvmpy.migrate.block's SourceDisk and DestinationDisk."""

    def __init__(self, index: int, blk: Any):
        self.index, self.blk = index, blk
        self.path, self.fd, self.readonly = blk.spec.file, blk.fd, blk.readonly
        self.image_bytes = blk.capacity * 512

    def start_dirty_tracking(self) -> Any:
        # the copier reads through its own descriptor: a guest reboot closes the device's, and
        # its number could be reused by another file before the copier notices the reboot
        self.fd = os.dup(self.blk.fd)
        return self.blk.start_dirty_tracking()

    def stop_dirty_tracking(self) -> None:
        self.blk.stop_dirty_tracking()
        if self.fd != self.blk.fd:
            os.close(self.fd)
            self.fd = self.blk.fd

    def claim(self) -> None:
        try:
            self.blk.take_lock(0.0)
        except DeviceError:
            raise MigrationError(f"copying drive {self.index} ({self.path})",
                                 detail="another VM holds its image (the source's own? block migration "
                                        "needs each side its own copy; shared storage needs no `block`)") from None


def _drives(machine: "Machine") -> list[Drive]:
    """The board's disks with their --drive positions (query-block's virtio-disk<N>)."""
    specs = machine.config.drives
    return [Drive(next(i for i, s in enumerate(specs) if s is blk.spec), blk) for blk in _disks(machine.board)]


# -- the destination ------------------------------------------------------------------------------
def incoming_live(machine: "Machine", uri: str, accept_timeout_s: float = ACCEPT_TIMEOUT_S) -> None:
    """--incoming tcp:/unix: (kvmpy.migrate.incoming, imported when called)."""
    from kvmpy.migrate.incoming import incoming_live as receive
    receive(machine, uri, accept_timeout_s)
