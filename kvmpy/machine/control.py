"""What the QMP monitor (kvmpy.monitor.control.MachineControl) asks of a Machine beyond its
lifecycle: the query commands' answers in QEMU's shapes, and the migrate family.

A mixin of Machine, kept apart so lifecycle.py stays about run states. `migrate` and
`migrate_incoming` run in a background thread, as QEMU's do: the monitor answers at once and
clients poll `query-migrate` or wait for MIGRATION events.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from kvmpy import sandbox
from kvmpy.errors import KvmpyError, StateError
from kvmpy.machine.runstate import RunState

log = logging.getLogger(__name__)

# QEMU's defaults (migration/options.c): 300 ms downtime, 128 MiB/s, auto-converge's throttle.
DEFAULT_MIGRATION_PARAMETERS = {"downtime-limit": 300, "max-bandwidth": 128 << 20,
                                "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                                "max-cpu-throttle": 99, "throttle-trigger-threshold": 50}
# compress: zstd per memory chunk (QEMU's name for compressed pages; kvmpy's codec is zstd);
# block: copy the writable local disks too (QEMU's historical block migration, kvmpy.migrate.block)
DEFAULT_MIGRATION_CAPABILITIES = {"auto-converge": False, "compress": False, "block": False}
ACTIVE = ("setup", "active", "device", "cancelling")


class MachineControlMixin:
    """Needs from Machine: config, board, memory, status/run_state, _lock, save(), incoming(),
    emit()."""

    def _init_control(self) -> None:
        self.migration_parameters: dict[str, Any] = dict(DEFAULT_MIGRATION_PARAMETERS)
        self.migration_capabilities: dict[str, bool] = dict(DEFAULT_MIGRATION_CAPABILITIES)
        self._migration: dict[str, Any] = {}
        self._migration_thread: threading.Thread | None = None
        self._live = None                                   # the live migration's engine (precopy)
        self._board_watchers: list[Callable[[str], None]] = []

    # -- who hears before a board's VM closes ---------------------------------------------------
    def add_board_watcher(self, fn: Callable[[str], None]) -> None:
        """`fn(cause)` runs on the thread that closes the board, before its VM fd closes (a
        reboot rebuilding it, the machine ending). Why: a live migration reads the VM's dirty log
        from its own thread; told first, it stops touching the fd (waiting out an ioctl in flight)
        and reports `cause`, instead of failing on a closed fd (EBADF) or, worse, an ioctl on
        whatever file reused the number. `fn` must not block on the machine's lock."""
        self._board_watchers.append(fn)

    def remove_board_watcher(self, fn: Callable[[str], None]) -> None:
        if fn in self._board_watchers:
            self._board_watchers.remove(fn)

    def _board_closing(self, cause: str) -> None:
        """Tell every watcher that the board's VM is about to close, and why."""
        for fn in list(self._board_watchers):
            try:
                fn(cause)
            except Exception:   # a watcher's bug must not keep the board (and its fds) alive
                log.exception("board watcher failed")

    # -- queries --------------------------------------------------------------------------------
    def query_cpus(self) -> list[dict]:
        board = self.board
        threads = board.vcpu_threads if board is not None else []
        return [{"cpu-index": t.vcpu.id, "qom-path": f"/machine/unattached/device[{t.vcpu.id}]",
                 "thread-id": t.native_id or 0, "target": "x86_64",
                 "props": {"socket-id": t.vcpu.id, "core-id": 0, "thread-id": 0}}
                for t in threads]

    def query_block(self) -> list[dict]:
        out = []
        for i, spec in enumerate(self.config.drives):
            out.append({"device": f"virtio-disk{i}", "qdev": f"/machine/peripheral-anon/virtio-disk{i}",
                        "locked": False, "removable": False, "type": "unknown",
                        "inserted": {"file": spec.file, "ro": spec.readonly, "drv": "raw",
                                     "backing_file_depth": 0, "encrypted": False,
                                     "cache": {"writeback": spec.cache != "none", "direct": spec.cache == "none",
                                               "no-flush": False}}})
        return out

    def registers_text(self, cpu_index: int) -> str:
        """HMP `info registers`: the vCPU is parked for the read if it runs, then runs on."""
        from kvmpy.vcpu.report import describe_vcpu
        with self._lock:
            board = self.board
            threads = board.vcpu_threads if board is not None else []
            if not 0 <= cpu_index < len(threads):
                raise StateError("info registers", detail=f"there is no CPU {cpu_index}")
            t = threads[cpu_index]
            parked_here = not t.paused and self.run_state is RunState.RUNNING
            if parked_here and not t.pause(timeout=5.0):
                raise KvmpyError("info registers", detail=f"CPU {cpu_index} did not leave KVM_RUN within 5 s")
            try:
                return "\n".join(describe_vcpu(t.vcpu, self.memory.read)) + "\n"
            finally:
                if parked_here:
                    t.resume()

    # -- migration ------------------------------------------------------------------------------
    def migrate(self, uri: str, blk: bool | None = None) -> None:
        """file:/exec: save the machine in one pass (kvmpy.machine.snapshot); tcp:/unix: migrate
        it live (kvmpy.migrate.live, above this package: imported when called). `blk` (QMP
        migrate's old `blk`, HMP `migrate -b`) turns the `block` capability on for this one."""
        from kvmpy.migrate.uri import parse_uri
        target = parse_uri(uri)
        if target.scheme in ("tcp", "unix"):
            from kvmpy.migrate.live import migrate_out
            capabilities = dict(self.migration_capabilities)
            if blk is not None:
                capabilities["block"] = bool(blk)

            def live() -> None:
                migrate_out(self, uri, on_engine=self._attach_engine, capabilities=capabilities)
            self._start_migration(live, outgoing=True, live=True)
            return
        if blk or (blk is None and self.migration_capabilities.get("block")):
            raise StateError(f"migrating to {uri}", detail="block migration copies disks to a live destination "
                                                           "(tcp:/unix:); a snapshot never holds the disks")
        self._start_migration(lambda: self.save(uri), outgoing=True)

    def _attach_engine(self, engine) -> None:
        self._live = engine

    def migrate_incoming(self, uri: str) -> None:
        if self.run_state is not RunState.INMIGRATE or self.board is not None:
            raise StateError("migrate-incoming", detail=f"the machine is {self.status}, not waiting for "
                                                        "an incoming migration (--incoming defer)")
        self._start_migration(lambda: self.incoming(uri), outgoing=False)

    def migrate_cancel(self) -> None:
        engine = getattr(self, "_live", None)
        if engine is not None and self._migration.get("status") in ACTIVE:
            engine.cancel()     # the source runs on unless the destination already confirmed
            return
        if self._migration.get("status") in ACTIVE:
            raise KvmpyError("migrate_cancel", detail="a file:/exec: save completes in one pass and cannot be "
                                                      "cancelled part way")

    def query_migrate(self) -> dict:
        engine = getattr(self, "_live", None)
        if engine is not None and self._migration.get("status") in ACTIVE:
            return engine.stats()
        info = dict(self._migration)
        if info.get("status") in ACTIVE and "started" in info:
            info["total-time"] = int((time.monotonic() - info["started"]) * 1000)
        info.pop("started", None)
        return info

    def _start_migration(self, work, outgoing: bool, live: bool = False) -> None:
        """Run `work` on the migration thread. A live migration's engine reports its own status
        (query_migrate asks it once attached); until then the status stays "setup"."""
        with self._lock:
            if self._migration.get("status") in ACTIVE:
                raise StateError("migrate", detail="a migration is already in progress")
            self._migration = {"status": "setup", "started": time.monotonic()}
            self._live = None

        def run() -> None:
            sandbox.enter("migration", getattr(self, "confinement", None) and self.confinement.policy)
            if not live:
                self._migration["status"] = "active"
            try:
                work()
            except KvmpyError as e:
                from kvmpy.migrate.channel import Cancelled     # light: errors only
                if isinstance(e, Cancelled):    # migrate_cancel: the user's wish, not a failure
                    log.info("migration cancelled: %s", e)
                else:
                    log.error("migration failed: %s", e)
                engine = getattr(self, "_live", None)
                self._migration = engine.stats() if engine is not None and outgoing else \
                    {"status": "failed", "error-desc": str(e)}
                return
            except Exception as e:   # a bug: still a failed migration, and the machine lives on
                log.exception("migration failed")
                self._migration = {"status": "failed", "error-desc": f"internal error: {type(e).__name__}: {e}"}
                return
            stats = dict(getattr(self, "last_migration", None) or {}) if outgoing else {}
            stats["status"] = "completed"
            self._migration = stats
        self._migration_thread = threading.Thread(target=run, name="kvmpy-migration", daemon=True)
        self._migration_thread.start()
