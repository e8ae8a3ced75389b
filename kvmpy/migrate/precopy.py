"""Live pre-copy migration, the source side: all of RAM while the guest runs, then passes of the
pages it dirtied, until what is left fits the downtime limit at the measured bandwidth; then the
switchover (pause, last pages, device and vCPU state), and only once the destination confirms
does the source give the guest up.

The engine knows no Machine: it drives a `PrecopySource` (kvmpy.migrate.live adapts a Machine;
tier 0 uses a fake over real GuestMemory) through a `Channel` (a connected socket). The stream
is the snapshot format (kvmpy.migrate.stream) in its run layout:

    header  CONFIG  | dest: ACCEPT or REFUSE <why>
    [block: DISK SETUP | dest: ACCEPT or REFUSE <why>   DISK* (the bulk pass of every image)]
    MEMORY_RUNS* (pass 0: non-zero pages)  MEMORY_RUNS* DISK* (each later pass: dirty pages, zero
    runs; dirty disk blocks), each pass followed by SYNC | dest: SYNCED, where ACCEPT said "sync"
    -- source paused --  STATE  MEMORY_RUNS* DISK* (the last dirty pages and blocks)  END
    | dest: LOADED (everything applied, vCPUs not started) or FAILED <why>
    source: postmigrate, then GO | dest: starts the guest (without GO it exits with an error)

Exactly one copy runs at every instant: the source resumes on any failure before LOADED
(connection cut, destination dead or refusing, cancel); the destination starts only after GO,
which the source sends once it has stopped for good. Replies are one ASCII line each.

STATE goes before the last pages: the destination decodes and restores it while they travel,
where after them it was ~50 ms of the downtime in L1 (a destination also takes the older order).
Both ends do it on the migration thread, not beside the pages on a thread of its own: tried in
L1 (2 CPUs), the Python work and the page thread shared the CPUs and the GIL; the last pages took
0.10-0.13 ms a page instead of ~0.07 and the destination's decode and restore twice as long,
more than the 24-65 ms of capture it hid (a shorter GIL switch interval did not change that).

Why SYNC: when a pass ends the socket buffers hold megabytes the destination has not applied;
unwaited, the switchover paid for them (most of an idle guest's 800 ms downtime in L1) and the
bandwidth deciding the switch counted bytes into a buffer, not into the destination's RAM.
"""
from __future__ import annotations

import logging
import re
import time
from contextlib import ExitStack
from typing import Any, Callable, Protocol

import numpy as np

from kvmpy.errors import KvmpyError, MigrationError
from kvmpy.migrate.channel import (ACCEPT, FAILED, GO, LOADED, OFFER_SYNC, REFUSE, REPLY_TIMEOUT_S,  # noqa: F401
                                   SYNCED, Cancelled, Channel)     # (re-exported)
from kvmpy.migrate.converge import (BANDWIDTH_WINDOW_BYTES, SWITCH_PAGES, THROTTLE_DEFAULTS,  # noqa: F401
                                    AutoConverge, BandwidthMeter, converged, dirtied_faster_than_sent, dirty_windows,
                                    expected_downtime_ms, next_throttle, runqueue_wait_s, worth_another_pass)
from kvmpy.migrate.codec import prepare_classes
from kvmpy.migrate.downtime import collector_paused
from kvmpy.migrate.info import migration_info
from kvmpy.migrate.pages import PAGE_SIZE, nonzero_pages
from kvmpy.migrate.receive import receive_memory_and_state  # noqa: F401  (re-exported: the other side)
from kvmpy.migrate.stream import CHUNK_PAGES, SectionKind, StreamWriter

log = logging.getLogger(__name__)

# the source's part of the downtime in the "migrated:" line: pause, state, last pages (bench-migrate)
SOURCE_DOWNTIME_LOGGED = re.compile(rb"downtime \d+ ms \(pause ([\d.]+), state ([\d.]+), last \d+ pages ([\d.]+),")
WHOLE_RANGE_PAGES = 4096            # a dirty set this small is taken and sent a range at a time
SWITCHOVER_CHUNK_PAGES = 256        # the paused guest's last pages go in chunks this small (StreamWriter.chunk_pages)


class PrecopySource(Protocol):
    """What the engine needs from the machine being migrated."""
    memory: Any                 # GuestMemory: ranges, buffer()
    tracker: Any                # memslots.dirty.DirtyTracker over that memory

    def identity(self) -> bytes: ...            # the encoded CONFIG payload
    def pause(self) -> None: ...                # every vCPU parked, I/O quiesced, disks flushed
    def resume(self) -> None: ...               # back to running (a failed migration)
    def state(self) -> bytes: ...               # the encoded STATE payload (paused)
    def completed(self) -> None: ...            # postmigrate: the destination has the guest
    def check(self) -> None: ...                # raise when migrating cannot go on (a guest reboot)
    def emit(self, event: str, data: dict) -> None: ...
    # with the `block` capability: block_disks() -> [kvmpy.migrate.block.SourceDisk], writable only


class Precopy:
    """One outgoing migration. `run()` on a migration thread; `stats()` and `cancel()` from any.
    `params`: QMP's downtime-limit (ms) and max-bandwidth (bytes/s, 0 unlimited)."""

    def __init__(self, source: PrecopySource, channel: Channel, params: dict[str, Any],
                 reply_timeout_s: float = REPLY_TIMEOUT_S, capabilities: dict[str, bool] | None = None,
                 monitor_gate: Any = None):
        self.source, self.channel = source, channel
        self.params = dict(params)
        self.auto_converge = bool((capabilities or {}).get("auto-converge"))
        self.compress = bool((capabilities or {}).get("compress"))      # zstd per memory chunk
        self.block = None                   # kvmpy.migrate.block.BlockCopy with `block`
        if (capabilities or {}).get("block"):
            from kvmpy.migrate.block import BlockCopy
            disks = getattr(source, "block_disks", None)
            self.block = BlockCopy(disks() if callable(disks) else [])
        self.throttler = AutoConverge(source, self.params)
        self.downtime_limit_ms = float(params.get("downtime-limit", 300))
        self.max_bandwidth = int(params.get("max-bandwidth", 0))
        self.channel.max_bandwidth = self.max_bandwidth
        self.reply_timeout_s = reply_timeout_s
        self.status = "setup"
        self.started = time.monotonic()
        self.setup_ms = 0
        self.passes = 0                     # dirty-sync-count
        self.meter = BandwidthMeter()       # bytes/s: the first pass, then windows of passes
        self.sync_ms = 0.0                  # the last read of the dirty log(s): a cost of every pass
        self.remaining_pages = sum(r.size for r in source.memory.ranges) // PAGE_SIZE
        self.dirty_rate = 0.0               # pages/s
        self.expected_ms = 0.0
        self.downtime_ms: int | None = None
        self.total_ms: int | None = None
        self.normal_pages = self.zero_pages = 0
        self.error = ""
        self.on_status: Callable[[str], None] | None = None
        self._writer: StreamWriter | None = None
        self.dest_syncs = False             # the destination offered SYNC in its ACCEPT
        self._downtime = ExitStack()        # what holds for the switchover only (no GC)
        # a lock every monitor command runs under (Machine.monitor_gate), held from the pause until
        # the last byte is out, as QEMU's stop-and-copy holds the BQL: a client polling
        # query-migrate took ms of Python (and the GIL) a call in L1, inside the downtime
        self.monitor_gate = monitor_gate
        self._gate = ExitStack()
        self._syncs_sent = 0

    # -- queries --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """query-migrate's shape (kvmpy.migrate.info)."""
        return migration_info(self)

    def cancel(self) -> None:
        """migrate_cancel: the source resumes unless the destination already confirmed."""
        if self.status in ("setup", "active", "device"):
            self._set_status("cancelling")
            self.channel.cancel()

    def _set_status(self, status: str) -> None:
        if self.status == "cancelling" and status not in ("cancelled", "completed", "failed"):
            return
        self.status = status
        self.source.emit("MIGRATION", {"status": status})
        if self.on_status is not None:
            self.on_status(status)

    # -- the migration --------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Migrate; returns the final statistics, or raises (the source running again)."""
        source, channel = self.source, self.channel
        self._set_status("setup")
        paused = False
        confirmed = False
        try:
            writer = self._writer = StreamWriter(channel, sparse=False)
            writer.copy_pages = True            # the guest runs while pages go out
            if self.compress:
                from kvmpy.migrate import zstd
                if not zstd.available():
                    raise MigrationError("migrating with compress", detail="libzstd is not available here")
                writer.compress = True
            writer.write_header()
            writer.write_section(SectionKind.CONFIG, source.identity())
            word, why = channel.read_reply(self.reply_timeout_s)
            if word == REFUSE:
                raise MigrationError("the destination refused the migration", detail=why)
            if word != ACCEPT:
                raise MigrationError("the destination answered", detail=f"{word[:40]!r} instead of accepting")
            self.dest_syncs = OFFER_SYNC in why.split()
            prepare_classes()                   # the state's encoding tables now, not in the downtime
            block = self.block
            if block is not None:
                block.setup(writer, lambda: channel.read_reply(self.reply_timeout_s), ACCEPT, REFUSE)
            source.tracker.start()
            if block is not None:
                block.start()
            self.setup_ms = int((time.monotonic() - self.started) * 1000)
            self._set_status("active")
            if block is not None:
                block.bulk_pass(writer, source.check)
            self._first_pass(writer)
            sent = 0
            previous_left = self.normal_pages        # the first pass's dirty set: all it sent
            while True:
                source.check()
                synced_at = time.monotonic()
                self.remaining_pages = source.tracker.sync()
                # dirty disk blocks count as pages of the same bytes in the downtime arithmetic
                left = self.remaining_pages + (-(-block.sync() // PAGE_SIZE) if block is not None else 0)
                self.sync_ms = (time.monotonic() - synced_at) * 1000   # the switchover reads the log too
                self.expected_ms = expected_downtime_ms(left, self._switch_bandwidth(), self.sync_ms)
                fits = converged(left, self._switch_bandwidth(), self.downtime_limit_ms, self.sync_ms)
                if fits and not worth_another_pass(left, previous_left):
                    break
                previous_left = left
                if self.auto_converge and self.passes and not fits:
                    self.throttler.after_pass(left * PAGE_SIZE, sent)
                sending_at, waited_at = time.monotonic(), runqueue_wait_s()
                sent = self._dirty_pass(writer)
                if block is not None:
                    sent += block.dirty_pass(writer)
                sent_at = time.monotonic()
                self._catch_up(writer)
                elapsed = max(time.monotonic() - synced_at, 1e-6)
                self._measure(sent, max(time.monotonic() - sending_at, 1e-6), waited_at)
                self.dirty_rate = self.remaining_pages / elapsed
                self.passes += 1
                source.emit("MIGRATION_PASS", {"pass": self.passes})
                log.info("migration pass %d: %d pages, %.1f MiB in %.0f ms (log sync %.0f, send %.0f, destination "
                         "catching up %.0f); %.1f MB/s (%.1f without waiting for a CPU), expected downtime %.0f ms",
                         self.passes, self.remaining_pages,
                         sent / 2**20, elapsed * 1000, (sending_at - synced_at) * 1000, (sent_at - sending_at) * 1000,
                         (synced_at + elapsed - sent_at) * 1000, self.bandwidth / 1e6,
                         self._switch_bandwidth() / 1e6, self.expected_ms)
            # switchover
            self.throttler.set(0)
            source.check()
            if self.monitor_gate is not None:   # first: a command running now finishes before the pause
                self._gate.enter_context(self.monitor_gate)
            paused_at = time.monotonic()
            self._downtime.enter_context(collector_paused())    # no garbage collection until LOADED
            source.pause()
            paused = True
            self._set_status("device")
            writer.copy_pages = False
            writer.chunk_pages = SWITCHOVER_CHUNK_PAGES
            channel.max_bandwidth = 0           # the guest is stopped: no reason to hold back now
            marks = [time.monotonic()]          # where the downtime goes: logged at the end
            writer.write_section(SectionKind.STATE, source.state())     # first: see the docstring
            marks.append(time.monotonic())
            self.remaining_pages = source.tracker.sync()
            last_pages = self.remaining_pages
            self._dirty_pass(writer, last=True)
            if block is not None:           # the disks were flushed by pause(): the last blocks
                block.sync()
                block.dirty_pass(writer)
            self.remaining_pages = 0
            writer.finish()
            self._gate.close()              # all sent: the destination loads, the monitor may answer
            marks.append(time.monotonic())
            word, why = channel.read_reply(self.reply_timeout_s)
            marks.append(time.monotonic())
            self._downtime.close()
            if word == FAILED:
                raise MigrationError("the destination could not load the guest", detail=why)
            if word != LOADED:
                raise MigrationError("the destination answered", detail=f"{word[:40]!r} instead of confirming")
            if channel.cancelled:
                raise Cancelled("migration cancelled")
            confirmed = True            # the destination has everything: the source gives it up
            source.completed()
            self.downtime_ms = int((time.monotonic() - paused_at) * 1000)
            try:
                channel.send_line(GO)
            except OSError as exc:      # the destination exits without GO; the source keeps the state
                log.error("migration: the destination confirmed but GO could not be sent (%s); "
                          "the guest stays paused here (postmigrate)", exc)
                raise MigrationError("telling the destination to start", errno=exc.errno) from None
            finally:                    # after GO: switching the log off is no part of the downtime
                source.tracker.stop()
                if block is not None:
                    block.stop()
            self.total_ms = int((time.monotonic() - self.started) * 1000)
            self._set_status("completed")
            log.info("migrated: %d passes, %d pages sent, %d zero, downtime %d ms (pause %.0f, state %.0f, last "
                     "%d pages %.0f, destination's load after them %.0f ms), total %d ms", self.passes,
                     self.normal_pages, self.zero_pages, self.downtime_ms, (marks[0] - paused_at) * 1000,
                     (marks[1] - marks[0]) * 1000, last_pages, (marks[2] - marks[1]) * 1000,
                     (marks[3] - marks[2]) * 1000, self.total_ms)
            return self.stats()
        except BaseException as exc:
            self._gate.close()
            self._downtime.close()
            original = exc
            self.total_ms = int((time.monotonic() - self.started) * 1000)
            self.throttler.set(0)
            if isinstance(exc, KvmpyError) and not isinstance(exc, Cancelled):
                try:                # an ioctl on a VM (a read of a disk) a guest reboot closed
                    source.check()
                except MigrationError as why:
                    exc = why
            if not confirmed:
                source.tracker.stop()
                if self.block is not None:
                    self.block.stop()
                if paused:
                    source.resume()
            cancelled = isinstance(exc, Cancelled) or channel.cancelled
            self.error = "" if cancelled and not confirmed else str(exc)
            self._set_status("cancelled" if cancelled and not confirmed else "failed")
            if cancelled and not confirmed:
                raise Cancelled("migration cancelled", detail="the guest runs on here") from None
            if exc is not original:
                raise exc from None
            raise

    def _measure(self, sent: int, elapsed: float, waited_at: float | None = None) -> None:
        """One pass into the meter (converge.BandwidthMeter); `waited_at`: runqueue_wait_s() when
        the pass began."""
        waited = 0.0
        if waited_at is not None and (now := runqueue_wait_s()) is not None:
            waited = now - waited_at
        self.meter.measure(sent, elapsed, waited)

    @property
    def throttle(self) -> int:
        """cpu-throttle-percentage (auto-converge's, 0 without it)."""
        return self.throttler.percent

    @property
    def bandwidth(self) -> float:
        return self.meter.bandwidth

    def _switch_bandwidth(self) -> float:
        """The bandwidth the expected downtime is computed with: measured without the waits for
        a CPU (see _measure), but never above max-bandwidth (a small first pass fits in the rate
        limiter's first window and in the socket buffers at memory speed, which says nothing
        about the link)."""
        rate = self.meter.switch_bandwidth or self.meter.bandwidth
        if self.max_bandwidth:
            return min(rate, float(self.max_bandwidth))
        return rate

    def _first_pass(self, writer: StreamWriter) -> None:
        """All of RAM, zero pages left out (the destination's fresh RAM is zero)."""
        started, before, cpu_at, waited_at = time.monotonic(), self.channel.bytes_sent, time.thread_time(), runqueue_wait_s()
        scan_s = 0.0
        memory = self.source.memory
        extents = getattr(self.source, "extents", lambda: None)() or {}
        for r in memory.ranges:
            buffer = memory.buffer(r.gpa, r.size)
            for first in range(0, r.size // PAGE_SIZE, CHUNK_PAGES * 16):
                count = min(CHUNK_PAGES * 16, r.size // PAGE_SIZE - first)
                piece = buffer[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
                ext = extents.get(r.gpa)
                window = None if ext is None else [(s - first * PAGE_SIZE, n) for s, n in ext
                                                   if s < (first + count) * PAGE_SIZE and s + n > first * PAGE_SIZE]
                scan_at = time.monotonic()
                mask = nonzero_pages(np.frombuffer(piece, dtype=np.uint8), window)
                scan_s += time.monotonic() - scan_at
                sent = int(np.count_nonzero(mask))
                self.normal_pages += sent
                self.zero_pages += count - sent
                if sent:    # copied and tested again as sent: one the guest zeroed since goes as a zero run
                    writer.write_marked(r.gpa, buffer, mask, first)
        sent_at = time.monotonic()
        self._catch_up(writer)
        elapsed = max(time.monotonic() - started, 1e-6)
        self._measure(self.channel.bytes_sent - before, elapsed, waited_at)
        # where a first pass goes (CPU-bound or waiting on the link and the destination?)
        log.info("migration's first pass: %.1f MiB in %.0f ms (zero scan %.0f, send %.0f, destination catching "
                 "up %.0f), this thread's CPU %.0f ms", (self.channel.bytes_sent - before) / 2**20, elapsed * 1000,
                 scan_s * 1000, (sent_at - started - scan_s) * 1000, (started + elapsed - sent_at) * 1000,
                 (time.thread_time() - cpu_at) * 1000)

    def _catch_up(self, writer: StreamWriter) -> None:
        """After a pass: wait until the destination applied all of it (SYNC, answered SYNCED), so
        what the switchover sends is only what the guest dirtied since, and the bandwidth is
        the rate into the destination's RAM. Nothing to do where the destination has no SYNC."""
        if not self.dest_syncs:
            return
        self._syncs_sent += 1
        writer.write_sync(self._syncs_sent)
        word, why = self.channel.read_reply(self.reply_timeout_s)
        if word == FAILED:
            raise MigrationError("the destination failed", detail=why)
        if word != SYNCED:
            raise MigrationError("the destination answered", detail=f"{word[:40]!r} instead of SYNCED")

    def _dirty_pass(self, writer: StreamWriter, last: bool = False) -> int:
        """Send what `sync` found, chunk by chunk, clearing each chunk just before sending it
        (`last`: the switchover's, whose pages KVM need not write-protect again: DirtyTracker.take)."""
        before = self.channel.bytes_sent
        memory, tracker = self.source.memory, self.source.tracker
        # a small set (the passes near the switchover, the switchover's own) in one take per range:
        # chunk by chunk, its pages, scattered over most chunks, cost a dozen numpy calls and an
        # ioctl each, hundreds of ms under nested TCG; a large one keeps each chunk's clear next
        # to its copy, so the guest's writes meanwhile re-dirty as few pages as possible
        whole = self.remaining_pages <= WHOLE_RANGE_PAGES
        for index, r in enumerate(memory.ranges):
            buffer = memory.buffer(r.gpa, r.size)
            npages = r.size // PAGE_SIZE
            if whole:
                windows = [(0, npages)]
            else:
                windows = dirty_windows(tracker, index, npages)
            for first, count in windows:
                dirty = tracker.take(index, first, count, protect=not last)
                taken = int(np.count_nonzero(dirty))
                if taken:
                    self.normal_pages += taken
                    writer.write_marked(r.gpa, buffer, dirty, first)
        return self.channel.bytes_sent - before
