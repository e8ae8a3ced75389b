"""Dirty-page bookkeeping: KVM's per-slot bitmaps (little-endian u64 words) as page numbers."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

from kvmpy.memslots.layout import PAGE_SIZE

if TYPE_CHECKING:
    import numpy as np


def bitmap_words(npages: int) -> int:
    """u64 words KVM needs for a slot of `npages` pages (KVM rounds up to 64 bits)."""
    return (npages + 63) // 64


def bitmap_to_pages(bitmap: "np.ndarray", npages: int) -> "np.ndarray":
    """Indices of the set bits of a KVM dirty bitmap (bit i of byte j = page 8*j + i)."""
    import numpy as np
    bits = np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:npages]
    return np.flatnonzero(bits)


def pages_to_bitmap(pages: "np.ndarray | list[int]", npages: int) -> "np.ndarray":
    """The inverse of bitmap_to_pages, as u64 words (used for KVM_CLEAR_DIRTY_LOG and tests)."""
    import numpy as np
    bits = np.zeros(bitmap_words(npages) * 64, dtype=np.uint8)
    bits[np.asarray(pages, dtype=np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.uint64)


def page_of(gpa: int) -> int:
    return gpa // PAGE_SIZE


def take_marks(marks: bytearray, first: int, end: int) -> "np.ndarray":
    """Bytes [first, end) of a userspace dirty map (GuestMemory.dirty_maps), copied out and zeroed
    in one step: the C data path sets them without the GIL while this runs. With the extension,
    kvmpy_dirty_take exchanges whole words atomically, so a concurrent mark lands either in this
    copy or in the map for the next take. Without it, nothing marks outside the GIL: zero exactly
    the bytes read as set, so a mark between the read and the clear is never erased."""
    import numpy as np
    out = np.zeros(max(end - first, 0), dtype=np.uint8)
    if not out.size:
        return out
    take = _c_take()
    if take is not None:
        ffi, fn = take
        live = ffi.from_buffer("uint8_t[]", marks, require_writable=True)     # alive across the call
        fn(live + first, ffi.from_buffer("uint8_t[]", out, require_writable=True), out.size)
        return out
    live = np.frombuffer(marks, dtype=np.uint8)[first:end]
    out[:] = live
    live[out != 0] = 0
    return out


_C_TAKE: list = []


def _c_take() -> "tuple[Any, Any] | None":
    """(ffi, kvmpy_dirty_take) from the C extension, or None in an unbuilt checkout."""
    if not _C_TAKE:
        try:
            from kvmpy.ioctl._kvm import ffi, lib
            _C_TAKE.append((ffi, lib.kvmpy_dirty_take) if hasattr(lib, "kvmpy_dirty_take") else None)
        except ImportError:
            _C_TAKE.append(None)
    return _C_TAKE[0]


class ExtraDirtyLog(Protocol):
    """Another writer of guest RAM that neither KVM's log nor GuestMemory's map sees (vhost-net's
    kernel worker: kvmpy.vhost.dirtylog.VhostDirtyLog). DirtyTracker starts it after its own logs
    (before the first page is sent), takes it into `pending` at every sync, and stops it with them."""

    def start(self) -> None: ...

    def stop(self) -> None: ...           # also after a failed or partial start

    def take_into(self, pending: Sequence["np.ndarray"]) -> int: ...   # take-and-clear into pending


class DirtyTracker:
    """Which guest pages changed since they were last sent: KVM's dirty log (the guest's writes)
    merged with GuestMemory's userspace dirty map (kvmpy's own writes), per RAM range.

    Why the dirty log and not the dirty ring: measured, the log is as fast or faster everywhere
    (benchmarks/dirty_track_bench.py, `make bench-dirty`; L1, a guest rewriting 24 MiB, the set
    collected every 100 ms or every second as passes do):
    - Every 100 ms: alike. 8.6-14.6 k page writes/s tracked either way (write faults cost ~100 us
      each in L1) and 5-7 ms a harvest of ~1000-1500 pages.
    - Every second: the log let the guest run at 120-720 k page writes/s (a page faults once a
      pass), the ring of 4096 entries (QEMU's default size) at 9-11 k: a hot set larger than the
      ring fills it, and the reset that frees entries re-protects their pages, so the guest
      keeps faulting (15-19 full exits a run). With 65536 entries (1 MiB a vCPU) the guest ran
      as fast as with the log (250-270 k against 120-510 k), but a harvest of ~9500 pages took
      25 ms against the log's 12: 16 bytes an entry against a bit a page. That harvest lands
      inside the switchover's downtime.
    - The log also re-protects only what is about to be sent, chunk by chunk, which a ring's
      reset (all harvested entries at once) cannot; the ring must be chosen before the first
      vCPU exists, and its full exits need handling in the vCPU loop.
    - On PVM (the development host) the ring overflows: it runs many guest writes between its
      full checks and writes over entries not yet harvested, losing dirty pages.
    The log is switched on per slot only while migrating (re-registering the slot with
    KVM_MEM_LOG_DIRTY_PAGES). With KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_GET_DIRTY_LOG only reads
    (so `sync` may count the remaining set without losing it) and KVM_CLEAR_DIRTY_LOG re-protects
    just the pages about to be sent, chunk by chunk: a page the guest writes after its chunk was
    cleared is logged again, and write faults stay confined to pages actually being sent. Without
    the capability GET_DIRTY_LOG clears as it reads and the bits wait in `pending`.

    The order that makes it correct: marks are set after a write, and a page is cleared (KVM and
    userspace) before its contents are copied; so every write either precedes the copy or sets
    the page dirty again. `vm` needs set_user_memory_region/get_dirty_log/clear_dirty_log and
    enable_manual_dirty_log_protect (kvmpy.ioctl.Vm, or a fake in tier 0).

    The VM belongs to the machine, which may close it (a reboot, the guest's end) while the
    migration thread is between reading `vm.fd` and the ioctl: `detach(cause)`, called by the
    closer first, waits out an ioctl in flight and turns every later one into a MigrationError
    naming the cause, so the tracker never touches a closed or reused descriptor.
    """

    def __init__(self, memory, vm, manual_protect: bool | None = None):
        self.memory, self.vm = memory, vm
        self.npages = [r.size // PAGE_SIZE for r in memory.ranges]
        self._manual = manual_protect
        self._pending: list | None = None
        self.active = False
        self.extra_logs: list[ExtraDirtyLog] = []   # merged at every sync (vhost-net's log)
        self._vm_lock = threading.Lock()        # held across each ioctl on `vm`
        self.detached: str | None = None        # why the VM is gone (detach's cause)

    def detach(self, cause: str) -> None:
        """The VM is about to close (`cause`, e.g. "the guest rebooted"): returns once no ioctl on
        it is in flight; every later one raises MigrationError(cause) without touching it."""
        with self._vm_lock:
            if self.detached is None:
                self.detached = cause

    def _vm_call(self, call: Callable[..., Any], *args: Any) -> Any:
        with self._vm_lock:
            if self.detached is not None:
                from kvmpy.errors import MigrationError
                raise MigrationError("tracking dirty pages", detail=f"{self.detached}: the VM is closed")
            return call(*args)

    def start(self) -> None:
        """Clear everything and track from now on (before the first page is sent)."""
        import numpy as np
        from kvmpy.errors import IoctlError
        if self._manual is None:
            try:
                self._vm_call(self.vm.enable_manual_dirty_log_protect)
                self._manual = True
            except IoctlError:
                self._manual = False
        elif self._manual:
            self._vm_call(self.vm.enable_manual_dirty_log_protect)
        self._pending = [np.zeros(n, dtype=bool) for n in self.npages]
        self.memory.start_tracking()
        self._set_logging(True)
        self.active = True
        try:
            for extra in self.extra_logs:
                extra.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop logging (a failed or cancelled migration, or after the last pass)."""
        if not self.active:
            return
        self.active = False
        self.memory.stop_tracking()
        for extra in self.extra_logs:
            extra.stop()
        if self.detached is not None:   # the VM is closed: its slots' flags went with it
            return
        from kvmpy.errors import KvmpyError
        try:
            self._set_logging(False)
        except KvmpyError as exc:   # the VM went away (a reboot rebuilt it): nothing to switch off
            import logging
            logging.getLogger(__name__).warning("switching the dirty log off: %s", exc)

    def _set_logging(self, on: bool) -> None:
        from kvmpy.ioctl import lib
        flags = lib.KVM_MEM_LOG_DIRTY_PAGES if on else 0
        mem = self.memory
        for i, r in enumerate(mem.ranges):
            self._vm_call(self.vm.set_user_memory_region, r.slot, r.gpa, r.size, mem.host_address(i), flags)

    @property
    def manual_protect(self) -> bool:
        return bool(self._manual)

    def sync(self) -> int:
        """Collect KVM's log and the userspace map into `pending`; the number of dirty pages."""
        import numpy as np
        assert self._pending is not None
        for extra in self.extra_logs:       # into pending, which take() clears just before the copy
            extra.take_into(self._pending)
        total = 0
        for i, r in enumerate(self.memory.ranges):
            n = self.npages[i]
            bits = np.unpackbits(self._vm_call(self.vm.get_dirty_log, r.slot, n).view(np.uint8),
                                 bitorder="little")[:n]
            pending = self._pending[i]
            pending |= bits.astype(bool)
            pending |= np.frombuffer(self.memory.dirty_maps[i], dtype=np.uint8).astype(bool)
            total += int(np.count_nonzero(pending))
        return total

    def dirty_chunks(self, index: int, chunk_pages: int) -> list[int]:
        """First pages of the `chunk_pages`-sized chunks of range `index` that hold anything to
        send (synced log bits or userspace marks): a pass over an idle guest then costs a few
        chunks, not a numpy walk of every chunk of RAM (under nested TCG that walk alone took
        longer than a 300 ms downtime). A chunk the userspace map marks after this call waits
        for the next pass; the switchover asks again with the guest paused."""
        import numpy as np
        return (np.flatnonzero(self._chunked_marks(index, chunk_pages).any(axis=1)) * chunk_pages).tolist()

    def dirty_counts(self, index: int, chunk_pages: int) -> "np.ndarray":
        """How many pages of each `chunk_pages`-sized chunk of range `index` hold anything to
        send (as dirty_chunks, counted): the pre-copy engine takes runs of chunks holding about a
        chunk's worth of dirty pages at a time, not a take (and a KVM_CLEAR_DIRTY_LOG) per chunk
        of address space."""
        import numpy as np
        return np.count_nonzero(self._chunked_marks(index, chunk_pages), axis=1)

    def _chunked_marks(self, index: int, chunk_pages: int) -> "np.ndarray":
        """Synced log bits or userspace marks of range `index`, one row per `chunk_pages` chunk
        (the last row padded with clean pages)."""
        import numpy as np
        assert self._pending is not None
        n = self.npages[index]
        chunks = -(-n // chunk_pages)
        any_dirty = np.zeros(chunks * chunk_pages, dtype=bool)
        any_dirty[:n] = self._pending[index]
        any_dirty[:n] |= np.frombuffer(self.memory.dirty_maps[index], dtype=np.uint8).astype(bool)
        return any_dirty.reshape(chunks, chunk_pages)

    def take(self, index: int, first: int, count: int, protect: bool = True) -> "np.ndarray":
        """The dirty pages (bool per page) of pages [first, first+count) of range `index`,
        cleared in KVM's log and the userspace map: send them after this call, never before.
        `first` must be a multiple of 64 (KVM_CLEAR_DIRTY_LOG's rule).

        `protect=False` leaves KVM's copy of the bits (and the pages writable) for a take whose
        pages are the last this log will ever report: a switchover's, with every vCPU stopped
        and the log switched off afterwards whatever happens. KVM_CLEAR_DIRTY_LOG
        write-protects each page again, work that is then pure downtime."""
        import numpy as np
        assert self._pending is not None
        end = min(first + count, self.npages[index])
        pending = self._pending[index]
        # The marked pages as indices of a private copy, never of the live map: the C data path
        # marks it without the GIL, and numpy's nonzero counts, then fills, and raises when a
        # mark lands in between (a CI failure). Indices, not runs of the window: a switchover
        # takes all of RAM at once, and diffing 128 Ki entries for a few marks cost ~30 ms of
        # its downtime in L1.
        marked = np.flatnonzero(take_marks(self.memory.dirty_maps[index], first, end))
        chunk = pending[first:end].copy()
        if self._manual and protect:
            kvm_bits = pending[first:end]
            if kvm_bits.any():
                words = pages_to_bitmap(np.flatnonzero(kvm_bits), end - first)
                self._vm_call(self.vm.clear_dirty_log, self.memory.ranges[index].slot, first, end - first, words)
        if marked.size:
            chunk[marked] = True
        pending[first:end] = False
        return chunk

