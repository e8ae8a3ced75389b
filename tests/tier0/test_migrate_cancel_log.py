"""migrate_cancel is the user's wish: the migration thread logs it at INFO, a failure at ERROR
(kvmpy/machine/control.py). It used to log both as "migration failed" at ERROR."""
from __future__ import annotations

import logging

import pytest

from kvmpy.errors import MigrationError
from kvmpy.machine.control import MachineControlMixin
from kvmpy.migrate.channel import Cancelled


class Control(MachineControlMixin):
    """Just what _start_migration touches."""

    def __init__(self):
        import threading
        self._lock = threading.RLock()
        self._migration: dict = {}
        self.confinement = None


@pytest.mark.parametrize("error, level, words", [
    (Cancelled("migration cancelled", detail="the guest runs on here"), logging.INFO, "migration cancelled"),
    (MigrationError("sending the migration stream", detail="the connection failed"), logging.ERROR, "migration failed"),
])
def test_a_cancel_is_info_and_a_failure_an_error(caplog, monkeypatch, error, level, words):
    from kvmpy import sandbox
    monkeypatch.setattr(sandbox, "enter", lambda *a, **k: None)
    control = Control()

    def work():
        raise error
    with caplog.at_level(logging.DEBUG, logger="kvmpy.machine.control"):
        control._start_migration(work, outgoing=False)
        control._migration_thread.join(10)
    [record] = [r for r in caplog.records if r.name == "kvmpy.machine.control"]
    assert record.levelno == level and record.getMessage().startswith(words)
    assert control._migration["status"] == "failed"
