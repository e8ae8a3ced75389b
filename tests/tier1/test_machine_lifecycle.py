"""The machine's lifecycle and the in-process API on the host's KVM, with the counter guest
(tests/guest/counter.S: counts at 0x300000, dirties 64 pages, prints "tick N" every 4096 counts,
writes N to port 0x520)."""
from __future__ import annotations

import re
import time

import pytest

from kvmpy import Machine
from kvmpy.errors import StateError
from support.tinyguest import GUEST_DIR

COUNTER = 0x300000


@pytest.fixture
def counter_elf(kvm_available) -> str:
    path = GUEST_DIR / "out" / "counter.elf"
    assert path.exists(), "make -C tests/guest builds the counter guest"
    return str(path)


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_start_pause_resume_stop(counter_elf):
    events: list[tuple[str, dict]] = []
    with Machine(kernel=counter_elf, memory="64M") as m:
        m.add_listener(lambda name, data: events.append((name, data)))
        assert m.status == "prelaunch"
        m.start()
        assert m.status == "running"
        m.console.expect(r"tick 00000003", timeout=20)
        m.pause()
        assert m.status == "paused"
        frozen = m.memory.read_u32(COUNTER)
        time.sleep(0.2)
        assert m.memory.read_u32(COUNTER) == frozen          # every vCPU really parked
        m.resume()
        wait_for(lambda: m.memory.read_u32(COUNTER) > frozen + 10000)
        m.stop()
        end = m.wait(10)
        assert end is not None and end.status == 0 and not end.guest
        assert m.status == "shutdown"
    names = [n for n, _ in events]
    assert names == ["STOP", "RESUME", "SHUTDOWN"]
    assert events[-1][1] == {"guest": False, "reason": "host-qmp-quit"}


def test_paused_start_is_prelaunch_until_resumed(counter_elf):
    with Machine(kernel=counter_elf, memory="64M", paused=True) as m:
        m.start()
        assert m.status == "prelaunch"
        time.sleep(0.2)
        assert m.memory.read_u32(COUNTER) == 0 and "tick" not in m.console.text
        m.resume()
        assert m.status == "running"
        m.console.expect(r"tick 00000002", timeout=20)


def test_reset_keeps_memory_and_console_objects(counter_elf):
    events = []
    with Machine(kernel=counter_elf, memory="64M") as m:
        m.add_listener(lambda name, data: events.append((name, data)))
        m.start()
        memory, console = m.memory, m.console
        m.console.expect(r"tick 00000002", timeout=20)
        m.reset()
        wait_for(lambda: ("RESET", {"guest": False, "reason": "host-qmp-system-reset"}) in events)
        assert m.memory is memory and m.console is console
        console.expect(r"counter guest\n", timeout=20)        # booted again
        # RAM is not cleared by a reset (as on a PC, and in QEMU): the count goes on from there
        tick = int(console.expect(r"tick ([0-9a-f]{8})\n", timeout=20).group(1), 16)
        assert tick > 2
        assert m.boots == 2 and m.status == "running"


def test_port_hook_models_a_device(counter_elf):
    seen: list[int] = []
    with Machine(kernel=counter_elf, memory="64M") as m:
        m.add_pio_hook(0x520, 4, write=lambda port, size, value: seen.append(value))
        assert any(d.id == "hook-pio-520" for d in []) is False
        m.start()
        wait_for(lambda: len(seen) >= 3, 20)
        assert seen[:3] == [1, 2, 3]
        assert any(d.id == "hook-pio-520" and d.kind == "python-hook" for d in m.devices)
        with pytest.raises(StateError):
            m.add_pio_hook(0x530, 1)


def test_device_table_lists_every_device_with_its_ranges(counter_elf, tmp_path):
    with Machine(kernel=counter_elf, memory="64M", rng=True) as m:
        m.start(paused=True)
        table = {d.id: d for d in m.devices}
        assert table["com1"].kind == "isa-serial" and str(table["com1"].ranges[0]) == "pio 0x3f8-0x3ff"
        for id_ in ("i8042", "rtc", "pci", "acpi-pm", "debug-exit", "virtio-rng0"):
            assert id_ in table
        assert table["virtio-rng0"].kind == "virtio-rng-pci"
        assert any(r.bus == "mmio" for r in table["virtio-rng0"].ranges)


def _ticks(text: str) -> list[int]:
    return [int(t, 16) for t in re.findall(r"tick ([0-9a-f]{8})\n", text)]


def test_save_restore_in_process_is_byte_exact_and_continues(counter_elf, tmp_path):
    snap = tmp_path / "vm.snap"
    with Machine(kernel=counter_elf, memory="64M", smp=1) as src:
        src.start()
        src.console.expect(r"tick 00000004", timeout=20)
        src.save(f"file:{snap}")
        assert src.status == "postmigrate"
        ram = [a.copy() for a in src.memory.arrays]
        regs = src.board.vcpu_states()[0].regs
        before = src.console.text
        with Machine.restore(f"file:{snap}", memory="64M", paused=True) as dst:
            assert dst.status == "paused"
            assert all((a == b).all() for a, b in zip(ram, dst.memory.arrays))
            assert dst.board.vcpu_states()[0].regs == regs
            dst.resume()
            dst.console.expect(r"tick [0-9a-f]{8}\n(.|\n)*tick [0-9a-f]{8}\n", timeout=20)
            after = dst.console.text
    ticks = _ticks(before + after)
    assert ticks == list(range(1, len(ticks) + 1)), "a tick was lost or repeated across the save"


def test_restore_refuses_a_different_machine_before_any_vcpu(counter_elf, tmp_path):
    snap = tmp_path / "vm.snap"
    with Machine(kernel=counter_elf, memory="64M") as src:
        src.start()
        src.console.expect(r"tick 00000001", timeout=20)
        src.save(f"file:{snap}")
    from kvmpy.errors import MigrationError
    with pytest.raises(MigrationError, match="128 MiB|64 MiB"):
        Machine.restore(f"file:{snap}", memory="128M")
    with pytest.raises(MigrationError, match="virtio-rng0"):
        Machine.restore(f"file:{snap}", memory="64M", rng=True)
    with pytest.raises(MigrationError, match="vCPUs"):
        Machine.restore(f"file:{snap}", memory="64M", smp=2)


@pytest.mark.parametrize("how", ["file", "exec"])
def test_saved_guest_continues_in_a_new_process(counter_elf, tmp_path, how):
    """Saved through the API, restored by `kvmpy boot --incoming` in another process."""
    import subprocess
    import sys
    snap, out = tmp_path / "vm.snap", tmp_path / "serial.log"
    save_uri = f"file:{snap}" if how == "file" else f"exec:cat > {snap}"
    # virtio devices too: their state classes must be known to a fresh process's decoder
    with Machine(kernel=counter_elf, memory="64M", rng=True, console="null") as src:
        src.start()
        src.console.expect(r"tick 00000003", timeout=20)
        src.save(save_uri)
        ram = [a.copy() for a in src.memory.arrays]
        before = src.console.text
    restore_uri = f"file:{snap}" if how == "file" else f"exec:cat {snap}"
    proc = subprocess.run([sys.executable, "-m", "kvmpy", "boot", "--incoming", restore_uri, "-m", "64M",
                           "--rng", "--virtio-console", "null", "--serial", f"file:{out}", "--timeout", "1.5"],
                          capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert proc.returncode == 124, proc.stderr          # ran until its timeout
    after = out.read_text()
    ticks = _ticks(before + after)
    assert len(ticks) > len(_ticks(before)) + 2
    assert ticks == list(range(1, len(ticks) + 1)), "a tick was lost or repeated across processes"
    assert ram[0][COUNTER:COUNTER + 4].view("<u4")[0] > 0


def test_bad_snapshots_are_one_clear_line(counter_elf, tmp_path):
    import subprocess
    import sys
    snap = tmp_path / "vm.snap"
    with Machine(kernel=counter_elf, memory="64M") as src:
        src.start()
        src.console.expect(r"tick 00000001", timeout=20)
        src.save(f"file:{snap}")
    data = snap.read_bytes()
    (tmp_path / "truncated").write_bytes(data[:len(data) // 3])
    corrupt = bytearray(data)
    corrupt[100] ^= 0xFF
    (tmp_path / "corrupt").write_bytes(bytes(corrupt))
    cases = [(f"file:{tmp_path / 'missing'}", "missing"), (f"file:{tmp_path / 'truncated'}", "truncated"),
             (f"file:{tmp_path / 'corrupt'}", "checksum|corrupt"), ("exec:exit 3", "3"),
             (f"file:{snap}", "MiB")]
    for uri, needle in cases:
        mem = "128M" if needle == "MiB" else "64M"
        proc = subprocess.run([sys.executable, "-m", "kvmpy", "boot", "--incoming", uri, "-m", mem,
                               "--serial", "null", "--timeout", "5"],
                              capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
        assert proc.returncode == 1, (uri, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("kvmpy: error:"), (uri, proc.stderr)
        assert re.search(needle, lines[0]), (uri, lines[0])


def test_kvmpy_boot_with_a_qmp_monitor_end_to_end(counter_elf, tmp_path):
    """`kvmpy boot -S --qmp ...` driven by kvmpy's QMP client: prelaunch, cont, stop, info
    registers, migrate to a file, reset, quit; then the snapshot restores with --incoming."""
    import subprocess
    import sys
    from kvmpy.monitor.client import QmpClient
    sock, snap = tmp_path / "q.sock", tmp_path / "q.snap"
    proc = subprocess.Popen([sys.executable, "-m", "kvmpy", "boot", "--kernel", counter_elf, "-m", "64M",
                             "--serial", "null", "-S", "--name", "vm1", "--timeout", "60",
                             "--qmp", f"unix:{sock},server=on,wait=off"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(sock.exists, 30)
        with QmpClient(str(sock)) as q:
            assert q.execute("query-status")["status"] == "prelaunch"
            assert q.execute("query-name") == {"name": "vm1"}
            q.execute("cont")
            assert q.execute("query-status") == {"status": "running", "running": True, "singlestep": False}
            cpus = q.execute("query-cpus-fast")
            assert cpus[0]["cpu-index"] == 0 and cpus[0]["thread-id"] > 0
            q.execute("stop")
            assert q.wait_event("STOP", 10)["event"] == "STOP"
            regs = q.execute("human-monitor-command", {"command-line": "info registers"})
            assert "rip=" in regs
            q.execute("migrate", {"uri": f"file:{snap}"})
            deadline = time.monotonic() + 30
            while (info := q.execute("query-migrate")).get("status") != "completed":
                assert info.get("status") != "failed" and time.monotonic() < deadline, info
                time.sleep(0.05)
            assert info["ram"]["total"] == 64 << 20 and info["ram"]["transferred"] > 0
            assert q.execute("query-status")["status"] == "postmigrate"
            q.execute("system_reset")
            assert q.wait_event("RESET", 10)["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
            q.execute("quit")
            assert q.wait_event("SHUTDOWN", 10)["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert proc.wait(30) == 0, proc.stderr.read()
        assert not sock.exists(), "the monitor socket was left behind"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with Machine.restore(f"file:{snap}", memory="64M") as m:
        m.console.expect(r"tick [0-9a-f]{8}\n", timeout=20)


@pytest.mark.parametrize("uri,needle", [("exec:cat > /dev/full", "status|No space"),
                                        ("file:/nonexistent-dir/vm.snap", "nonexistent-dir|No such file")])
def test_a_failed_save_leaves_the_guest_running(counter_elf, uri, needle):
    from kvmpy.errors import KvmpyError
    events = []
    with Machine(kernel=counter_elf, memory="64M") as m:
        m.add_listener(lambda name, data: events.append((name, data)))
        m.start()
        m.console.expect(r"tick 00000002\n", timeout=20)
        with pytest.raises(KvmpyError, match=needle):
            m.save(uri)
        assert m.status == "running"
        m.console.expect(r"tick [0-9a-f]{8}\n", timeout=20)      # it really runs on
    assert ("MIGRATION", {"status": "failed"}) in events and ("RESUME", {}) in events


def test_a_refused_restore_leaves_the_serial_log_alone(counter_elf, tmp_path):
    import subprocess
    import sys
    snap, log_file = tmp_path / "vm.snap", tmp_path / "serial.log"
    with Machine(kernel=counter_elf, memory="64M") as src:
        src.start()
        src.console.expect(r"tick 00000001", timeout=20)
        src.save(f"file:{snap}")
    log_file.write_text("precious\n")
    proc = subprocess.run([sys.executable, "-m", "kvmpy", "boot", "--incoming", f"file:{snap}", "-m", "64M",
                           "--rng", "--serial", f"file:{log_file}", "--timeout", "5"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1 and "virtio-rng0" in proc.stderr
    assert log_file.read_text() == "precious\n", "a refused restore truncated the serial log"


def test_reset_keeps_the_nics_tap_and_closing_removes_it(counter_elf):
    """As QEMU: a guest reset keeps the TAP kvmpy made (the host's addresses on it survive);
    the machine's end removes it."""
    from pathlib import Path
    from kvmpy.devices.virtio.netspec import parse_nic_spec
    name = f"kvtr{int(time.monotonic() * 1000) % 100000}"
    sysfs = Path("/sys/class/net") / name
    with Machine(kernel=counter_elf, memory="64M", nics=[parse_nic_spec(f"tap,ifname={name},vhost=off")]) as m:
        m.start()
        m.console.expect(r"tick 00000002", timeout=20)
        ifindex = (sysfs / "ifindex").read_text()
        m.reset()
        m.console.expect(r"counter guest\n", timeout=20)
        assert m.boots == 2 and (sysfs / "ifindex").read_text() == ifindex, "the reset made a new TAP"
    assert not sysfs.exists()


def test_qmp_cont_before_the_cli_starts_the_machine_runs_it_and_the_cli_start_is_a_no_op(counter_elf):
    """`kvmpy boot -S --qmp ...` listens before it builds the machine: a `cont` in that window
    built it paused (-S) and answered in prelaunch (a CI run's query-status right after saw
    prelaunch). Now `cont` answers once the guest runs, and the CLI's own start then does nothing."""
    from kvmpy.monitor.commands import build_commands
    cont = build_commands()["cont"].run
    with Machine(kernel=counter_elf, memory="64M", paused=True) as m:
        assert m.status == "prelaunch" and m.board is None
        cont(m, {})
        assert m.status == "running"
        board = m.board
        m.start(unless_started=True)          # the CLI's start, second
        assert m.status == "running" and m.board is board
        frozen = m.memory.read_u32(COUNTER)
        wait_for(lambda: m.memory.read_u32(COUNTER) > frozen + 1000)
    with Machine(kernel=counter_elf, memory="64M", paused=True) as m:
        m.start(unless_started=True)          # the CLI first: built, prelaunch (-S)
        assert m.status == "prelaunch"
        cont(m, {})
        assert m.status == "running"


def test_qmp_stop_before_the_cli_starts_leaves_the_guest_paused_and_stop_in_inmigrate_keeps_it_paused(
        counter_elf, tmp_path):
    """The same window as `cont`'s: a `stop` before the CLI built the machine (no -S) did nothing,
    and the CLI's start then ran the guest. Now it is built parked and reported stopped (QEMU's
    `stop` only ever finds the guest running). A `stop` while inmigrate was ignored too: the
    restored guest ran; now it stays paused (QEMU's autostart off)."""
    from kvmpy.monitor.commands import build_commands
    commands = build_commands()
    stop, cont = commands["stop"].run, commands["cont"].run
    events: list[str] = []
    with Machine(kernel=counter_elf, memory="64M") as m:
        m.add_listener(lambda name, data: events.append(name))
        assert m.status == "prelaunch" and m.board is None
        stop(m, {})
        assert m.status == "paused" and m.board is not None and events == ["STOP"]
        board = m.board
        m.start(unless_started=True)          # the CLI's start, second: nothing
        assert m.status == "paused" and m.board is board
        time.sleep(0.3)
        assert m.memory.read_u32(COUNTER) == 0, "the guest ran while stopped"
        cont(m, {})
        assert m.status == "running" and events == ["STOP", "RESUME"]
        wait_for(lambda: m.memory.read_u32(COUNTER) > 1000)
        m.save(f"file:{tmp_path / 'vm.snap'}")
    with Machine(memory="64M", incoming=f"file:{tmp_path / 'vm.snap'}") as m:
        assert m.status == "inmigrate"
        stop(m, {})
        m.incoming(f"file:{tmp_path / 'vm.snap'}")
        assert m.status == "paused"
        frozen = m.memory.read_u32(COUNTER)
        time.sleep(0.3)
        assert m.memory.read_u32(COUNTER) == frozen > 1000, "the restored guest ran after a stop"
        cont(m, {})
        wait_for(lambda: m.memory.read_u32(COUNTER) > frozen + 1000)
