"""query-migrate's answer for an outgoing migration (qapi/migration.json MigrationInfo).

Apart from the engine (kvmpy.migrate.precopy) because it is the monitor's view of it: field names
and which fields appear when follow QEMU, so a QMP client written for QEMU reads kvmpy's.
"""
from __future__ import annotations

import time
from typing import Any

from kvmpy.migrate.pages import PAGE_SIZE


def migration_info(engine: Any) -> dict[str, Any]:
    """`engine`: a kvmpy.migrate.precopy.Precopy, read from any thread (plain attribute reads)."""
    total = sum(r.size for r in engine.source.memory.ranges)
    elapsed = int((time.monotonic() - engine.started) * 1000) if engine.total_ms is None else engine.total_ms
    info: dict[str, Any] = {
        "status": engine.status, "setup-time": engine.setup_ms, "total-time": elapsed,
        "ram": {"transferred": engine.channel.bytes_sent, "total": total,
                "remaining": engine.remaining_pages * PAGE_SIZE, "duplicate": engine.zero_pages,
                "normal": engine.normal_pages, "normal-bytes": engine.normal_pages * PAGE_SIZE,
                "dirty-pages-rate": int(engine.dirty_rate), "mbps": engine.bandwidth * 8 / 1e6,
                "dirty-sync-count": engine.passes, "page-size": PAGE_SIZE}}
    if engine.status in ("active", "device", "completed"):
        info["expected-downtime"] = int(engine.expected_ms)
    if engine.downtime_ms is not None:
        info["downtime"] = engine.downtime_ms
    if engine.throttle:
        info["cpu-throttle-percentage"] = engine.throttle
    if engine.block is not None:
        info["disk"] = engine.block.stats()
    if engine.error:
        info["error-desc"] = engine.error
    return info
