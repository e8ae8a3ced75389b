"""Live migration broken between the two ends by a relay (tests/support/faultrelay.py), the
counter guest migrated over tcp:127.0.0.1 from an API source to a `kvmpy boot --incoming`
process: the destination's first ACCEPT dropped (setup), one byte of the stream flipped, and its
LOADED dropped (switchover: the source paused, the destination holding the whole guest and
waiting for GO). Each time the source runs on, the destination exits with one line and never
runs the guest; after the switchover case the same source migrates again for real. Tier 2 runs
the same faults with a stock Linux guest between two network namespaces."""
from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

import pytest

from kvmpy import Machine
from kvmpy.errors import MigrationError
from kvmpy.migrate.live import migrate_out
from support.faultrelay import FaultRelay, listening
from support.tinyguest import GUEST_DIR

TICK = r"tick ([0-9a-f]{8})\n"


@pytest.fixture
def counter_elf(kvm_available) -> str:
    path = GUEST_DIR / "out" / "counter.elf"
    assert path.exists(), "make -C tests/guest builds the counter guest"
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_destination(port: int, serial) -> subprocess.Popen:
    """`kvmpy boot --incoming tcp:` (under a timeout, its console to the file `serial`), once it
    listens."""
    dest = subprocess.Popen([sys.executable, "-m", "kvmpy", "boot", "--incoming", f"tcp:127.0.0.1:{port}",
                             "-m", "64M", "--serial", f"file:{serial}", "--timeout", "60"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not listening(dest.pid, port):
        assert dest.poll() is None and time.monotonic() < deadline, dest.stderr.read() if dest.poll() else "slow"
        time.sleep(0.02)
    return dest


def ticks(text: str) -> list[int]:
    return [int(t, 16) for t in re.findall(TICK, text)]


def assert_runs_on(src: Machine) -> None:
    assert src.status == "running" and not src.memory.tracking
    seen = ticks(src.console.text)[-1]
    src.console.expect(rf"tick {seen + 2:08x}\n", timeout=20)


# fault -> (relay options, what the destination's one line says)
FAULTS = {
    "setup-accept-dropped": ({"drop_reply": b"KVMPY-ACCEPT"}, "truncated|end marker"),
    "corrupt-byte": ({"flip_at": 100_000}, "corrupt"),
    "switchover-loaded-dropped": ({"drop_reply": b"KVMPY-LOADED"}, "did not confirm the switchover"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_relay_fault_leaves_one_running_guest(counter_elf, tmp_path, fault):
    options, says = FAULTS[fault]
    port, dest_serial = free_port(), tmp_path / "dest-serial.log"
    dest = start_destination(port, dest_serial)
    relay = FaultRelay(("127.0.0.1", 0), ("127.0.0.1", port), **options)
    relay_port = relay.server.getsockname()[1]
    try:
        with Machine(kernel=counter_elf, memory="64M") as src:
            src.start()
            src.console.expect(r"tick 00000002", timeout=20)
            with pytest.raises(MigrationError, match="destination"):
                migrate_out(src, f"tcp:127.0.0.1:{relay_port}")
            assert relay.cut_reason is not None
            if "flip_at" in options:
                assert relay.flipped
            else:
                assert relay.cut_reason.startswith("dropped"), relay.cut_reason
            assert_runs_on(src)
            assert dest.wait(60) == 1
            lines = dest.stderr.read().strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("kvmpy: error:") and re.search(says, lines[0]), lines
            assert "tick" not in dest_serial.read_text(), "the destination ran the guest too"
            if fault == "switchover-loaded-dropped":      # paused, resumed: it still migrates
                final_port, serial = free_port(), tmp_path / "serial.log"
                final = start_destination(final_port, serial)
                try:
                    stats = migrate_out(src, f"tcp:127.0.0.1:{final_port}")
                    assert stats["status"] == "completed" and src.status == "postmigrate"
                    before = src.console.text
                    deadline = time.monotonic() + 30
                    while len(ticks(before + serial.read_text())) < len(ticks(before)) + 2:
                        assert time.monotonic() < deadline, "the migrated guest does not tick"
                        time.sleep(0.05)
                    all_ticks = ticks(before + serial.read_text())
                    assert all_ticks == list(range(1, len(all_ticks) + 1))
                finally:
                    final.kill()
                    final.wait()
    finally:
        relay.close()
        if dest.poll() is None:
            dest.kill()
        dest.wait()
