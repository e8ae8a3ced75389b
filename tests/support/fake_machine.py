"""FakeMachine: a MachineControl without KVM, for tier-0 tests of the monitor, the `kvmpy qmp`
client and QMP tooling. It follows the run-state transitions of the lifecycle design and emits
the same events, and counts "guest progress" on a thread so a test can see that pause() stops it
and that a stuck monitor client does not.
"""
from __future__ import annotations

import threading
from typing import Callable

from kvmpy.errors import ConfigError, MigrationError


class FakeMachine:
    def __init__(self, name: str | None = "fake", status: str = "running", smp: int = 2,
                 tick_s: float = 0.001):
        self.name = name
        self.status = status
        self.smp = smp
        self.calls: list[str] = []
        self.links: dict[str, bool] = {"net0": True, "net1": True}
        self.migration_parameters: dict = {"downtime-limit": 300, "max-bandwidth": 134217728,
                                           "multifd-channels": 2}
        self.migration_capabilities: dict = {"xbzrle": False, "events": False, "auto-converge": False}
        self._migration: dict = {}
        self._listeners: list[Callable[[str, dict], None]] = []
        self._lock = threading.Lock()
        self.monitor_gate = threading.Lock()    # the monitor's commands run under it (Machine's)
        self.progress = 0                 # the "guest's" counter: advances while running
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, args=(tick_s,), daemon=True,
                                        name="fake-guest")
        self._ticker.start()

    def _tick(self, tick_s: float) -> None:
        while not self._stop.wait(tick_s):
            if self.status == "running":
                self.progress += 1

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()

    # ---- events -------------------------------------------------------------------------
    def add_listener(self, fn: Callable[[str, dict], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str, dict], None]) -> None:
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    @property
    def listener_count(self) -> int:
        with self._lock:
            return len(self._listeners)

    def emit(self, name: str, data: dict | None = None) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            fn(name, dict(data or {}))

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self, paused: bool | None = None) -> None:
        self.calls.append("start")
        self.status = "running"
        self.emit("RESUME")

    def pause(self) -> None:
        self.calls.append("pause")
        if self.status == "running":
            self.status = "paused"
            self.emit("STOP")

    def resume(self) -> None:
        self.calls.append("resume")
        if self.status in ("paused", "postmigrate"):
            self.status = "running"
            self.emit("RESUME")

    def reset(self) -> None:
        self.calls.append("reset")
        self.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def powerdown(self) -> None:
        self.calls.append("powerdown")
        self.emit("POWERDOWN")

    def stop(self) -> None:
        self.calls.append("stop")
        self.status = "shutdown"
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})

    # ---- inspection ---------------------------------------------------------------------
    def query_cpus(self) -> list[dict]:
        return [{"cpu-index": i, "thread-id": 1000 + i, "qom-path": f"/machine/unattached/device[{i}]",
                 "target": "x86_64", "props": {"core-id": 0, "thread-id": 0, "socket-id": i}}
                for i in range(self.smp)]

    def query_block(self) -> list[dict]:
        return [{"device": "", "qdev": "virtio-blk0", "locked": False, "removable": False,
                 "type": "unknown", "inserted": {"file": "/tmp/disk.img", "ro": False, "drv": "raw"}}]

    def set_link(self, name: str, up: bool) -> bool:
        """The fake has NICs net0 and net1; `links` records what set_link made of them."""
        if name not in self.links:
            return False
        self.calls.append(f"set_link {name} {'up' if up else 'down'}")
        self.links[name] = up
        return True

    def registers_text(self, cpu_index: int) -> str:
        if not 0 <= cpu_index < self.smp:
            raise ConfigError("info registers", detail=f"no vCPU {cpu_index}")
        return f"RAX={cpu_index:016x} RBX=0000000000000000\nRIP=000000000000fff0 RFL=00000002\n"

    # ---- migration ----------------------------------------------------------------------
    def migrate(self, uri: str) -> None:
        self.calls.append(f"migrate {uri}")
        if uri.startswith(("tcp:", "unix:")):
            raise MigrationError(f"migrating to {uri}", detail="live migration is not there yet")
        self._migration = {"status": "active", "total-time": 0, "expected-downtime": 300,
                           "setup-time": 1, "ram": {"transferred": 0, "remaining": 4096,
                                                    "total": 4096, "mbps": 0.0}}
        self.emit("MIGRATION", {"status": "active"})

    def finish_migration(self) -> None:
        """Test helper: the background migration completes."""
        self._migration.update({"status": "completed", "downtime": 12, "total-time": 40})
        self._migration["ram"].update({"transferred": 4096, "remaining": 0})
        self.status = "postmigrate"
        self.emit("MIGRATION_PASS", {"pass": 1})
        self.emit("MIGRATION", {"status": "completed"})

    def migrate_incoming(self, uri: str) -> None:
        self.calls.append(f"migrate-incoming {uri}")

    def migrate_cancel(self) -> None:
        self.calls.append("migrate_cancel")
        if self._migration.get("status") == "active":
            self._migration["status"] = "cancelled"
            self.emit("MIGRATION", {"status": "cancelled"})

    def query_migrate(self) -> dict:
        return {key: (dict(value) if isinstance(value, dict) else value)
                for key, value in self._migration.items()}
