"""Helpers the live-migration tests share: migrating once the destination process listens, a
hash of a machine's whole RAM to compare both sides at the switchover (tier 1), and a source
whose guest keeps rewriting a hot set, with a model of KVM's dirty log (tier 0, benchmarks)."""
from __future__ import annotations

import errno
import hashlib
import time

from kvmpy import Machine
from kvmpy.errors import MigrationError
from kvmpy.migrate.live import migrate_out


def migrate_when_listening(machine: Machine, uri: str, timeout: float = 60.0, on_engine=None) -> dict:
    """migrate_out, retried while the destination process is not listening yet (`on_engine`:
    migrate_out's, called once connected)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return migrate_out(machine, uri, on_engine=on_engine)
        except MigrationError as e:
            if e.errno in (errno.ECONNREFUSED, errno.ENOENT) and time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise


def ram_hash(machine: Machine) -> str:
    """sha256 over every RAM range, in order."""
    h = hashlib.sha256()
    for a in machine.memory.arrays:
        h.update(a)
    return h.hexdigest()


class LogModelVm:
    """KVM's dirty log as bitmaps, one per slot, with manual protect (GET reads, CLEAR re-protects):
    what DirtyTracker needs of a Vm, for a source whose 'guest' is Python (RewritingSource)."""

    def __init__(self, memory) -> None:
        import numpy as np
        self.log = {r.slot: np.zeros(r.size // 4096, dtype=bool) for r in memory.ranges}
        self.logging: dict[int, bool] = {}

    def enable_manual_dirty_log_protect(self) -> None:
        pass

    def set_user_memory_region(self, slot, gpa, size, addr, flags=0) -> None:
        from kvmpy.ioctl import lib
        self.logging[slot] = bool(flags & lib.KVM_MEM_LOG_DIRTY_PAGES)

    def get_dirty_log(self, slot, npages):
        import numpy as np
        bits = np.zeros(-(-npages // 64) * 64, dtype=bool)
        bits[:npages] = self.log[slot]
        return np.packbits(bits, bitorder="little").view(np.uint64)

    def clear_dirty_log(self, slot, first, num, words):
        import numpy as np
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:num].astype(bool)
        self.log[slot][first:first + num] &= ~bits


class RewritingSource:
    """A pre-copy source (kvmpy.migrate.precopy.PrecopySource) whose guest keeps rewriting a hot
    set of `hot_pages` pages, in groups of `group` scattered over RAM as a Linux guest's physical pages
    are: between two reads of the dirty log every hot page was written again (one word changed,
    logged as a vCPU's store is), until pause(). Deterministic: how many passes a migration takes
    follows from the engine's arithmetic and its real costs, not from thread scheduling.
    `data_pages` pages (the hot set's among them) hold data before the migration starts.
    For benchmarks/migrate_passes.py and tier-0 tests; `on_event` sees every emit."""

    def __init__(self, ram: int, hot_pages: int, data_pages: int = 0, seed: int = 5, group: int = 4) -> None:
        import numpy as np
        from kvmpy.memslots import GuestMemory
        from kvmpy.memslots.dirty import DirtyTracker
        self.memory = GuestMemory.create(ram)
        self.vm = LogModelVm(self.memory)
        rng = np.random.default_rng(seed)
        npages = ram // 4096
        groups = rng.choice(npages // group, -(-hot_pages // group), replace=False)
        self.hot = np.sort((groups[:, None] * group + np.arange(group)).reshape(-1)[:hot_pages])
        words = np.frombuffer(self.memory.buffer(0, ram), dtype=np.uint32).reshape(npages, 1024)
        data = np.union1d(rng.choice(npages, min(data_pages, npages), replace=False), self.hot)
        words[data] = rng.integers(1, 1 << 32, size=(data.size, 1024), dtype=np.uint32)
        self._words = words
        self.sweeps = 0
        self.paused = False
        self.paused_at = self.completed_at = 0.0
        self.last_sync_pages = 0
        self.on_event = None            # (event, data) for every emit
        self.on_sync = None             # (dirty pages) after every read of the dirty log
        self.tracker = _RewriteBeforeSync(self, DirtyTracker)(self.memory, self.vm)

    def rewrite(self) -> None:
        """The guest's sweep over its hot set since the last log read."""
        self.sweeps += 1
        self._words[self.hot, 0] = self.sweeps
        slot = self.memory.ranges[0].slot
        if self.vm.logging.get(slot):
            self.vm.log[slot][self.hot] = True

    def identity(self) -> bytes:
        from kvmpy.migrate.codec import encode_state
        return encode_state({"memory": self.memory.ranges[0].size})

    def pause(self) -> None:
        self.paused_at = time.monotonic()
        self.paused = True

    def ram_digest(self) -> str:
        """sha256 of RAM (after the switchover: the paused guest's RAM as the destination got it)."""
        return hashlib.sha256(self.memory.buffer(0, self.memory.ranges[0].size)).hexdigest()

    def resume(self) -> None:
        self.paused = False

    def state(self) -> bytes:
        from kvmpy.migrate.codec import encode_state
        return encode_state({"cpu": "registers"})

    def completed(self) -> None:
        self.completed_at = time.monotonic()

    def check(self) -> None:
        pass

    def emit(self, event: str, data: dict) -> None:
        if self.on_event is not None:
            self.on_event(event, data)

    def close(self) -> None:
        self.memory.close()


def _RewriteBeforeSync(source: RewritingSource, base: type) -> type:
    """DirtyTracker whose sync() first lets the (running) guest sweep its hot set once."""
    class Tracker(base):
        def sync(self) -> int:
            if not source.paused:
                source.rewrite()
            count = super().sync()
            source.last_sync_pages = count
            if source.on_sync is not None:
                source.on_sync(count)
            return count
    return Tracker
