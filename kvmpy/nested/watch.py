"""Is L1 still making progress, and if not, where is it stuck?

L1 (Debian under QEMU TCG with nested SVM) has been seen to wedge: a tier-2 test stopped making
progress for 50 minutes, and pytest-timeout's SIGALRM inside L1 never ended it. Nothing inside L1
can be trusted to notice that, so the host watches two signals that come over the scratch share:

- a heartbeat: L1's init writes its uptime there every few seconds, from outside the chroot, so
  it keeps beating while a test is stuck and stops only when L1 itself stops;
- tier 2's progress file (kvmpy.nested.progress): which test runs, since when.

The harness polls an L1Watch every second; when it names a reason, diagnose() gathers what can
still be gathered before L1 is killed: where L1's vCPUs are (QEMU's monitor, a few samples,
symbolized: L1 boots with nokaslr so its saved kallsyms apply, and modules by L1's /proc/modules) and,
if L1's init still answers, the kernel stacks of its running and blocked tasks and a dmesg tail.
"""
from __future__ import annotations

import bisect
import logging
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvmpy.nested.progress import PROGRESS_FILE

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "heartbeat"
DUMP_REQUEST_FILE = "dump-request"
DUMP_DONE_FILE = "dump-done"
DUMP_FILE = "dump.txt"
MODULES_FILE = "l1-modules.txt"
MONITOR_SOCKET = "l1-monitor.sock"
HEARTBEAT_STALE_S = 90.0        # L1's init beats every 5 s; a loaded TCG L1 never missed 18 in a row
# A CPU of L1 halted with IF=1 and a vector pending above its PPR is one QEMU's TCG will never
# wake (seen on 7.2 and 10.0, the timer's vector 236 pending among them; the monitor's `nmi` did
# not wake it either): L1 then runs on its other CPU and its guests fail in every way, while the
# heartbeat goes on. The same lost interrupt wedges a CPU running a nested guest (undelivered_interrupts()).
# Looked for every LOST_WAKEUP_PROBE_S; a wedge once it lasts LOST_WAKEUP_S.
LOST_WAKEUP_PROBE_S = 10.0
LOST_WAKEUP_S = 30.0


@dataclass
class Tier2Progress:
    """What kvmpy.nested.progress reported: every test, the finished ones, the failed ones, and
    the one running now."""

    collected: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    suspect: set[str] = field(default_factory=set)      # failed with signs that L1 broke a guest
    current: str | None = None

    def feed(self, line: str) -> bool:
        """Take one line; True when it started a test (the caller times it)."""
        kind, _, nodeid = line.partition(" ")
        if not nodeid:
            return False
        if kind == "collected":
            self.collected.append(nodeid)
        elif kind == "start":
            self.current = nodeid
            return True
        elif kind == "failed":
            self.failed.add(nodeid)
        elif kind == "l1-suspect":
            self.suspect.add(nodeid)
        elif kind == "end":
            self.finished.add(nodeid)
            if self.current == nodeid:
                self.current = None
        return False

    def remaining(self) -> list[str]:
        return [n for n in self.collected if n not in self.finished]


class L1Watch:
    """Polled by the harness once a second while L1 runs its command; check() returns why L1 is
    considered wedged, or None. `test_budget_s` bounds one tier-2 test (None: no bound)."""

    def __init__(self, scratch: Path, test_budget_s: float | None = None,
                 heartbeat_stale_s: float = HEARTBEAT_STALE_S,
                 clock: Callable[[], float] = time.monotonic,
                 probe: Callable[[], list[str]] | None = None):
        self.scratch = scratch
        # interrupt_state() of L1's vCPUs, over the monitor socket in the scratch directory
        self.probe = probe or (lambda: interrupt_state(scratch / MONITOR_SOCKET)
                               if (scratch / MONITOR_SOCKET).exists() else [])
        self._probed_at: float | None = None
        self._stuck_since: dict[int, float] = {}
        self.test_budget_s = test_budget_s
        self.heartbeat_stale_s = heartbeat_stale_s
        self.clock = clock
        self.progress = Tier2Progress()
        self.heartbeat_stopped = False      # then L1's init will not answer a dump request either
        self._beat: str | None = None
        self._beat_at = clock()
        self._test_started_at: float | None = None
        self._offset = 0
        self._partial = ""

    def check(self) -> str | None:
        now = self.clock()
        self._read_progress(now)
        beat = _read_text(self.scratch / HEARTBEAT_FILE)
        if beat is not None and beat != self._beat:
            self._beat, self._beat_at = beat, now
        if now - self._beat_at > self.heartbeat_stale_s:
            self.heartbeat_stopped = True
            last = f"L1 uptime {self._beat.strip()}s" if self._beat else "none ever"
            return (f"L1's heartbeat stopped {now - self._beat_at:.0f}s ago (last: {last})"
                    + self._running())
        if (self.test_budget_s is not None and self.progress.current is not None
                and self._test_started_at is not None
                and now - self._test_started_at > self.test_budget_s):
            return (f"{self.progress.current} still running after "
                    f"{now - self._test_started_at:.0f}s (budget {self.test_budget_s:.0f}s; "
                    "L1's heartbeat goes on)")
        return self._lost_wakeup(now)

    def _lost_wakeup(self, now: float) -> str | None:
        if self._probed_at is not None and now - self._probed_at < LOST_WAKEUP_PROBE_S:
            return None
        self._probed_at = now
        try:
            lines = self.probe()
        except OSError:
            lines = []
        stuck = undelivered_interrupts(lines)
        self._stuck_since = {cpu: self._stuck_since.get(cpu, now) for cpu in stuck}
        for cpu, since in sorted(self._stuck_since.items()):
            if now - since < LOST_WAKEUP_S:
                continue
            vectors, halted = stuck[cpu]
            if not halted:
                return (f"L1's CPU{cpu} has run for {now - since:.0f}s with interrupts enabled, its timer "
                        f"expired and vectors {vectors} pending (an interrupt QEMU's TCG never "
                        "delivered, as in a nested guest's loop)" + self._running())
            return (f"L1's CPU{cpu} has sat halted for {now - since:.0f}s with interrupts enabled and "
                    f"vectors {vectors} pending (a wakeup QEMU's TCG lost; L1 runs on without it)"
                    + self._running())
        return None

    def _running(self) -> str:
        return f", during {self.progress.current}" if self.progress.current else ""

    def _read_progress(self, now: float) -> None:
        try:
            with (self.scratch / PROGRESS_FILE).open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return
        self._offset += len(chunk)
        text = self._partial + chunk.decode(errors="replace")
        *lines, self._partial = text.split("\n")
        for line in lines:
            if self.progress.feed(line):
                self._test_started_at = now


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


# --- diagnosis ---------------------------------------------------------------------------

def kallsyms_path(cache: Path, release: str) -> Path:
    """Where L1's init keeps the core kernel's text symbols (L1_INIT writes it on first boot)."""
    return cache / f"l1-kallsyms-nokaslr-{release}.txt"


class Symbolizer:
    """Kernel addresses of L1 to names: a System.map-format file for the core kernel (L1 runs
    nokaslr, so its kallsyms from any boot apply),
    L1's /proc/modules plus each module's own symbol table (`nm`) for module space."""

    def __init__(self, system_map: Path | None, modules_text: str = "",
                 module_paths: dict[str, Path] | None = None):
        self._addrs: list[int] = []
        self._names: list[str] = []
        if system_map is not None and system_map.is_file():
            pairs = []
            for line in system_map.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[1] in "tTwW":
                    pairs.append((int(parts[0], 16), parts[2]))
            pairs.sort()
            self._addrs = [a for a, _ in pairs]
            self._names = [n for _, n in pairs]
        self._modules: list[tuple[int, int, str]] = []
        for line in modules_text.splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[5].startswith("0x"):
                self._modules.append((int(parts[5], 16), int(parts[1]), parts[0]))
        self._module_paths = module_paths or {}
        self._module_syms: dict[str, tuple[list[int], list[str]]] = {}

    def name(self, addr: int) -> str:
        for base, size, module in self._modules:
            if base <= addr < base + size:
                inner = self._module_symbol(module, addr - base)
                return f"[{module}+{addr - base:#x}]" + (f" ~{inner}" if inner else "")
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or addr - self._addrs[i] > 0x100000:
            return "?"
        return f"{self._names[i]}+{addr - self._addrs[i]:#x}"

    def _module_symbol(self, module: str, offset: int) -> str | None:
        """Approximate: a module's .text is placed first in its core, so a .text symbol's value
        is close to its offset from the module base."""
        if module not in self._module_syms:
            self._module_syms[module] = _nm_text_symbols(self._module_paths.get(module))
        addrs, names = self._module_syms[module]
        i = bisect.bisect_right(addrs, offset) - 1
        return f"{names[i]}+{offset - addrs[i]:#x}" if i >= 0 else None


def _nm_text_symbols(ko: Path | None) -> tuple[list[int], list[str]]:
    if ko is None or not ko.is_file() or ko.suffix != ".ko":
        return [], []
    try:
        out = subprocess.run(["nm", "--defined-only", str(ko)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return [], []
    pairs = sorted((int(p[0], 16), p[2]) for p in (l.split() for l in out.splitlines())
                   if len(p) == 3 and p[1] in "tT")
    return [a for a, _ in pairs], [n for _, n in pairs]


_CPU_RE = re.compile(r"CPU#(\d+)")
_RIP_RE = re.compile(r"RIP=([0-9a-f]{16})")


def parse_rips(info_registers: str) -> dict[int, int]:
    """`info registers -a` output -> {cpu index: RIP}."""
    rips: dict[int, int] = {}
    cpu: int | None = None
    for line in info_registers.splitlines():
        m = _CPU_RE.search(line)
        if m:
            cpu = int(m.group(1))
        m = _RIP_RE.search(line)
        if m and cpu is not None and cpu not in rips:
            rips[cpu] = int(m.group(1), 16)
    return rips


def hmp(monitor: Path, command: str, timeout_s: float = 10.0) -> str:
    """One command on QEMU's human monitor (a Unix socket); its output."""
    return hmp_session(monitor, [command], timeout_s)[0]


def hmp_session(monitor: Path, commands: list[str], timeout_s: float = 10.0) -> list[str]:
    """Several commands in one monitor session (`cpu N` holds for the ones after it)."""
    outputs = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(monitor))
        _read_until_prompt(s)
        for command in commands:
            s.sendall(command.encode() + b"\n")
            outputs.append(_read_until_prompt(s).decode(errors="replace"))
    return outputs


_LAPIC_LINES = ("LVTT", "Timer", "ISR", "IRR", "APR", "SPIV")
_CPU_STATE_RE = re.compile(r"(RFL=[0-9a-f]+ \[[^\]]*\] CPL=\d II=\d A20=\d SMM=\d HLT=\d)")


def interrupt_state(monitor: Path) -> list[str]:
    """Each vCPU's flags and halt state and its local APIC's timer, in-service and pending
    vectors: whether a halted L1 CPU has an interrupt it was never given (IRR), one it was
    given and never ended (ISR), or no timer armed at all."""
    lines = []
    registers = hmp(monitor, "info registers -a")
    states = _CPU_STATE_RE.findall(registers)         # one per vCPU, in order
    outputs = hmp_session(monitor, [w for cpu in range(len(states)) for w in (f"cpu {cpu}", "info lapic")])
    for cpu, state in enumerate(states):
        lapic = outputs[2 * cpu + 1]
        kept = [" ".join(l.split()) for l in lapic.splitlines() if l.strip().startswith(_LAPIC_LINES)]
        lines.append(f"CPU{cpu} {state}; " + "; ".join(kept))
    return lines


_IRR_RE = re.compile(r"IRR ([0-9 ]+);")
_PPR_RE = re.compile(r"PPR 0x([0-9a-f]+)")


def lost_wakeups(state_lines: list[str]) -> dict[int, str]:
    """interrupt_state() lines -> {cpu: its pending vectors} for each CPU QEMU must deliver an
    interrupt to (undelivered_interrupts())."""
    return {cpu: vectors for cpu, (vectors, _) in undelivered_interrupts(state_lines).items()}


_LVTT_RE = re.compile(r"LVTT 0x([0-9a-f]+)")
_TIMER_EXPIRED_RE = re.compile(r"current_count = 0\b")


def undelivered_interrupts(state_lines: list[str]) -> dict[int, tuple[str, bool]]:
    """interrupt_state() lines -> {cpu: (its pending vectors, halted)} for each CPU with IF=1 and
    a vector pending in a priority class above its PPR's: one halted, or one running whose own
    timer expired with its vector among them.

    The running case is a nested guest's: bench-migrate's QEMU round sat 1500 s with L1's CPU0 in
    its L2 guest's loop at CPL 3 (IF=1, L1's timer at 0 with 236, 251 and 253 pending); the L1
    timer interrupt never made TCG leave guest mode. A busy CPU may show a vector pending at one
    probe; its expired, never re-armed timer at every probe for LOST_WAKEUP_S it does not."""
    stuck = {}
    for line in state_lines:
        m = re.match(r"CPU(\d+) RFL=([0-9a-f]+) .*HLT=(\d);", line)
        irr, ppr = _IRR_RE.search(line), _PPR_RE.search(line)
        if m is None or irr is None or ppr is None or not int(m.group(2), 16) & 0x200:
            continue
        vectors = [int(v) for v in irr.group(1).split()]
        if not vectors or max(vectors) >> 4 <= int(ppr.group(1), 16) >> 4:
            continue
        halted = m.group(3) == "1"
        if not halted:
            lvtt = _LVTT_RE.search(line)
            if lvtt is None or not _TIMER_EXPIRED_RE.search(line) or int(lvtt.group(1), 16) & 0xFF not in vectors:
                continue
        stuck[int(m.group(1))] = (irr.group(1).strip(), halted)
    return stuck


def _read_until_prompt(s: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"(qemu) "):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def diagnose(monitor: Path | None, scratch: Path, symbolizer_factory: Callable[[str], Symbolizer],
             samples: int = 5, dump_wait_s: float = 60.0) -> str:
    """Where a wedged L1 is: its vCPUs' RIPs over a few seconds, and what its init can still
    tell (kernel stacks of running/blocked tasks, dmesg). Never raises: it runs on a failure path."""
    lines = ["--- L1 diagnosis ---"]
    symbolizer = symbolizer_factory(_read_text(scratch / MODULES_FILE) or "")
    if monitor is not None:
        for n in range(samples):
            try:
                rips = parse_rips(hmp(monitor, "info registers -a"))
            except OSError as e:
                lines.append(f"L1 monitor {monitor}: {e}")
                break
            lines.append(f"sample {n}: " + "; ".join(
                f"CPU{cpu} {rip:#x} {symbolizer.name(rip)}" for cpu, rip in sorted(rips.items())))
            time.sleep(1.0)
        try:
            lines.extend(interrupt_state(monitor))
        except OSError as e:
            lines.append(f"L1 monitor {monitor}: {e}")
    request = scratch / DUMP_REQUEST_FILE
    try:
        request.write_text("1")
    except OSError as e:
        lines.append(f"cannot ask L1 for its task stacks: {e}")
        return "\n".join(lines)
    end = time.monotonic() + dump_wait_s
    while time.monotonic() < end and not (scratch / DUMP_DONE_FILE).exists():
        time.sleep(1.0)
    dump = _read_text(scratch / DUMP_FILE)
    if dump is None:
        lines.append(f"L1's init did not answer within {dump_wait_s:.0f}s: L1 userspace is stuck too")
    else:
        lines.append("from L1's init: kernel stacks of running (R) and blocked (D) tasks and of "
                     "every python/kvmpy/qemu thread; dmesg since L1 was ready:")
        lines.extend(dump.splitlines()[-600:])
    return "\n".join(lines)
