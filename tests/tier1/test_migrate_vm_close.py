"""A machine that closes its VM while a live migration reads the VM's dirty log (it ends: quit, a
timeout, a guest panic with --no-reboot; or it is reset) tells the migration first: the migration
fails with one line naming that cause, never `KVM_CLEAR_DIRTY_LOG ... EBADF` (bench-migrate's
32 MiB round), and the engine is out of the VM before its fd closes. Downtime-limit 0 never
fits and the test dirties a page after every pass itself, so the passes go on until the machine
acts, however fast this host's threads run."""
from __future__ import annotations

import socket
import threading

import pytest

from kvmpy import Machine
from kvmpy.errors import MigrationError
from kvmpy.migrate.live import migrate_out
from kvmpy.migrate.precopy import ACCEPT
from kvmpy.migrate.reader import StreamReader
from kvmpy.migrate.stream import SectionKind
from support.tinyguest import GUEST_DIR

SCRATCH_GPA = 0x1000000         # 16 MiB: RAM the counter guest never uses


@pytest.fixture
def counter_elf(kvm_available) -> str:
    path = GUEST_DIR / "out" / "counter.elf"
    assert path.exists(), "make -C tests/guest builds the counter guest"
    return str(path)


class DrainingDestination(threading.Thread):
    """Accepts the configuration and takes every byte after it, answering nothing more."""

    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(1)

    def run(self) -> None:
        peer, _ = self.server.accept()
        with peer:
            stream = peer.makefile("rb")
            assert StreamReader(stream).next_section().kind is SectionKind.CONFIG
            peer.sendall(ACCEPT + b"\n")
            while stream.read1(1 << 20):
                pass
        self.server.close()


@pytest.mark.parametrize("act, cause", [
    (lambda m: m.stop("stopped by the test"), "the machine ended (stopped by the test) during the migration"),
    (lambda m: m.reset(), "the machine was reset (system_reset) during the migration"),
])
def test_a_machine_closing_its_vm_ends_the_migration_with_the_cause(counter_elf, tmp_path, act, cause):
    path = str(tmp_path / "mig.sock")
    dest = DrainingDestination(path)
    dest.start()
    with Machine(kernel=counter_elf, memory="64M") as src:
        src.migration_parameters.update({"downtime-limit": 0, "max-bandwidth": 0})
        acted = threading.Event()

        def on_event(name: str, data: dict) -> None:
            if name == "MIGRATION" and data["status"] == "active":
                # dirty log on: a page dirtied before the first pass's sync too, or a guest that
                # got no CPU meanwhile (a loaded host) leaves nothing dirty, and the switchover
                # comes before any pass (the drain never confirms: a MigrationError, `acted` unset)
                src.memory.write(SCRATCH_GPA, b"dirty")
            if name != "MIGRATION_PASS":
                return
            # a page dirtied after every pass, whatever the guest managed to run meanwhile:
            # downtime-limit 0 then never fits, and the passes go on until the machine acts
            src.memory.write(SCRATCH_GPA + data["pass"] * 4096, b"dirty")
            if data["pass"] == 3 and not acted.is_set():
                acted.set()
                act(src)            # from the migration thread, as a QMP client's quit would race it
        src.add_listener(on_event)
        src.start()
        src.console.expect(r"tick 00000002", timeout=20)
        with pytest.raises(MigrationError) as info:
            migrate_out(src, f"unix:{path}")
        assert acted.is_set()
        message = str(info.value)
        assert cause in message, message
        assert "EBADF" not in message and "\n" not in message
        assert src._board_watchers == []            # the migration stopped watching
    dest.join(30)
