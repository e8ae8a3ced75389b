"""A guest reboot during a live migration closes the VM whose dirty log the engine reads: the
ioctl that fails then ends the migration with the reboot as its reason (a MigrationError), the
source running on, never an IoctlError traceback (seen in tier 2 when a slow migration outlived
the workload)."""
from __future__ import annotations

import socket
import threading

from kvmpy.errors import IoctlError, MigrationError
from kvmpy.migrate.precopy import Channel, Precopy

from test_migrate_precopy import Destination, FakeSource


def run_engine(source, params, deadline_s=20.0):
    a, b = socket.socketpair()
    dest = Destination(b)
    dest.start()
    engine = Precopy(source, Channel(a, io_timeout_s=5.0), params, reply_timeout_s=10.0)
    outcome: dict = {}

    def run():
        try:
            outcome["stats"] = engine.run()
        except MigrationError as e:
            outcome["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(deadline_s)
    if t.is_alive():
        engine.cancel()
        t.join(10)
        outcome["hung"] = True
    a.close()
    dest.join(10)
    return engine, dest, outcome


class RebootingSource(FakeSource):
    """The guest reboots during the first pass: the VM the dirty log belongs to is closed."""

    def __init__(self):
        super().__init__(1)
        self.rebooted = False

        def closed(*args, **kwargs):
            self.rebooted = True
            raise IoctlError("KVM_CLEAR_DIRTY_LOG(slot 0) on vm8", detail="object is closed")
        self.tracker.take = closed

    def check(self) -> None:
        if self.rebooted:
            raise MigrationError("migrating", detail="the guest rebooted during the migration; start it again")


def test_an_ioctl_on_a_vm_a_reboot_closed_fails_with_the_reboot_as_reason():
    source = RebootingSource()
    try:
        engine, dest, outcome = run_engine(source, {"downtime-limit": 0, "max-bandwidth": 0})
        error = outcome.get("error")
        assert isinstance(error, MigrationError) and "rebooted during the migration" in str(error)
        assert engine.stats()["status"] == "failed" and source.running
    finally:
        source.close()
