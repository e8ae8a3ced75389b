"""What every fuzz target shares: import paths, coverage instrumentation, the oracle's pieces
(guest RAM with guard bands, the documented error family) and the libFuzzer entry point.

A target is a script: `python fuzz/<name>.py [libFuzzer flags] [corpus dirs]`. It imports
common first (sys.path), imports the code under test inside `instrumented()` (atheris adds
coverage feedback to those modules only: instrumenting the standard library would halve the
rate for nothing), and ends with `common.main(test_one_input, seeds)`. `fuzz/run.py` runs
targets for a time or a fixed number of inputs and prints the table `make fuzz` shows.

The oracle, the same for every target:
  - an exception escapes test_one_input only if it is not a KvmpyError: the documented family
    is how kvmpy refuses bad input, anything else (IndexError, struct.error, a RecursionError)
    is a finding;
  - nothing is written outside the memory a device was given: GuardedMemory's RAM ranges sit
    between bands of a fixed random pattern (and so do the userspace dirty maps, which the C
    data path writes by pointer), checked after every input;
  - no input runs longer than libFuzzer's -timeout (fuzz/run.py passes FUZZ_TIMEOUT, 5 s).
"""
from __future__ import annotations

import contextlib
import logging
import mmap
import os
import random
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
for _path in (REPO_ROOT, REPO_ROOT / "tests"):      # kvmpy from this checkout; tests/support
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

try:
    import atheris
except ImportError:          # replaying an input without atheris: no coverage, same oracle
    atheris = None

# FUZZ_FRESH=1: targets that build their devices once and reset them per input (restore() of a
# saved state) build them per input instead: slower, the reference the reset is checked against
FRESH = os.environ.get("FUZZ_FRESH") == "1"
GUARD_BYTES = 4096
_GUARD_PATTERN = random.Random(0x6B766D).randbytes(GUARD_BYTES)

Seeds = Iterable[bytes]


@contextlib.contextmanager
def instrumented(*packages: str) -> Iterator[None]:
    """Import kvmpy's modules under test inside this block to give atheris their coverage:
    those in `packages` (default all of kvmpy). Naming only the surface under test matters:
    coverage tracing costs every instrumented branch, and a helper on the path (restoring PCI
    config space, say) can otherwise take most of an input's time for no new signal."""
    if atheris is None:
        yield
        return
    wanted = packages or ("kvmpy",)
    # atheris's include= takes top-level packages only; exclude= takes exact module names
    skip = [m for m in _kvmpy_modules() if not any(m == p or m.startswith(p + ".") for p in wanted)]
    with atheris.instrument_imports(include=["kvmpy"], exclude=skip):
        yield


def _kvmpy_modules() -> list[str]:
    """Every module name under kvmpy/, from the file tree (nothing imported)."""
    names = []
    for path in (REPO_ROOT / "kvmpy").rglob("*.py"):
        parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def scratch_dir(name: str) -> str:
    """A directory for the files a target writes per input (kernel images, disk images, streams):
    FUZZ_SCRATCH when fuzz/run.py set it (it removes the directory when the target ends:
    libFuzzer leaves with exit(), past Python's own clean-up), else a new one on tmpfs."""
    base = os.environ.get("FUZZ_SCRATCH")
    if base:
        path = os.path.join(base, name)
        os.makedirs(path, exist_ok=True)
        return path
    import tempfile
    return tempfile.mkdtemp(prefix=f"kvmpy-fuzz-{name}-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)


class GuardViolation(AssertionError):
    """Something wrote outside the memory it was given (a finding, never an expected error)."""


class GuardedBuffer:
    """`size` writable bytes between two guard bands, in an anonymous mapping of its own."""

    def __init__(self, size: int):
        self.size = size
        self._map = mmap.mmap(-1, size + 2 * GUARD_BYTES)
        self._map[:GUARD_BYTES] = _GUARD_PATTERN
        self._map[GUARD_BYTES + size:] = _GUARD_PATTERN
        self.view = memoryview(self._map)[GUARD_BYTES:GUARD_BYTES + size]

    def check(self, what: str) -> None:
        m = self._map
        if m[:GUARD_BYTES] != _GUARD_PATTERN:
            raise GuardViolation(f"write below {what} (guard band before it changed)")
        if m[GUARD_BYTES + self.size:] != _GUARD_PATTERN:
            raise GuardViolation(f"write past the end of {what} (guard band after it changed)")


def guarded_memory(layout: list[tuple[int, int]]):
    """A GuestMemory (imported lazily, inside the caller's instrumented block) whose RAM ranges
    (gpa, size) and dirty maps are GuardedBuffers; `check_guards()` raises GuardViolation and
    `clear()` zeroes RAM and dirty maps for the next input."""
    from kvmpy.memslots.layout import PAGE_SIZE, RamRange
    from kvmpy.memslots.memory import GuestMemory, _address_of

    class GuardedMemory(GuestMemory):
        def __init__(self, layout: list[tuple[int, int]]):   # noqa: D401 (no super: no mmap of its own)
            offset = 0
            self.ranges = []
            for slot, (gpa, size) in enumerate(sorted(layout)):
                self.ranges.append(RamRange(slot, gpa, size, offset))
                offset += size
            self.backend, self.fd, self.size = "fuzz", -1, offset
            self._mmaps, self._arrays = [], None
            self._ram = [GuardedBuffer(r.size) for r in self.ranges]
            self._dirty = [GuardedBuffer(r.size // PAGE_SIZE) for r in self.ranges]
            self._maps = [b.view for b in self._ram]
            self._addresses = [_address_of(b.view) for b in self._ram]
            self._starts = [r.gpa for r in self.ranges]
            self.tracking = False
            self.dirty_maps = [b.view for b in self._dirty]
            self._zeros = bytes(max(r.size for r in self.ranges))

        def check_guards(self) -> None:
            for r, ram, dirty in zip(self.ranges, self._ram, self._dirty):
                ram.check(f"the RAM range at {r.gpa:#x}")
                dirty.check(f"the dirty map of the RAM range at {r.gpa:#x}")

        def clear(self) -> None:
            for ram, dirty in zip(self._ram, self._dirty):
                ram.view[:] = self._zeros[:ram.size]
                dirty.view[:] = self._zeros[:dirty.size]
            self.tracking = False

        def close(self) -> None:       # the buffers live as long as the target process
            pass

    return GuardedMemory(layout)


class InternalErrorFinding(logging.Handler):
    """kvmpy catches unexpected exceptions at its edges (a QMP command, a device's notify) and
    logs them with their traceback instead of dying: under fuzzing that record is a finding."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[0] is not None and not issubclass(record.exc_info[0], _kvmpy_error()):
            raise AssertionError(f"kvmpy logged an unexpected exception: {record.getMessage()}") \
                from record.exc_info[1]


def _kvmpy_error() -> type:
    from kvmpy.errors import KvmpyError
    return KvmpyError


def quiet_logging() -> None:
    """Warnings a hostile input provokes by the thousand are kvmpy working: not printed. Errors
    are, and one with an unexpected exception attached raises (InternalErrorFinding)."""
    root = logging.getLogger()
    root.handlers = [InternalErrorFinding(logging.ERROR), logging.StreamHandler()]
    root.handlers[1].setLevel(logging.ERROR)
    root.setLevel(logging.ERROR)


def main(test_one_input: Callable[[bytes], None], seeds: Callable[[], Seeds] | None = None) -> None:
    """libFuzzer's main. With FUZZ_SEED_DIR set, write the target's seed inputs there first
    (fuzz/run.py passes that directory as the corpus, so a run starts from valid inputs)."""
    quiet_logging()
    seed_dir = os.environ.get("FUZZ_SEED_DIR")
    if seed_dir and seeds is not None:
        Path(seed_dir).mkdir(parents=True, exist_ok=True)
        for i, blob in enumerate(seeds()):
            (Path(seed_dir) / f"seed-{i:03d}").write_bytes(blob)
    if atheris is None:                      # replay the files named on the command line
        for arg in sys.argv[1:]:
            if not arg.startswith("-") and Path(arg).is_file():
                test_one_input(Path(arg).read_bytes())
        return
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
