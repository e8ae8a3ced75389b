"""vhost-net: the kernel moves virtio-net's rx/tx rings to and from the TAP, so no packet passes
through Python. One /dev/vhost-net fd per queue pair (its vring 0 is rx, 1 is tx).

`VhostNet` is the ioctl surface of <linux/vhost.h> (no policy). `VhostNetOffload` is what
virtio-net's NetOffload protocol asks for: at DRIVER_OK it hands the kernel the guest's memory
table, each ring's size, addresses and next index, the queue's notify ioeventfd (KICK) and the
MSI-X vector's irqfd eventfd (CALL), then the TAP fd (NET_SET_BACKEND). On stop (reset, pause,
snapshot) it detaches the TAP and reads each ring's next index back (GET_VRING_BASE) into the
Virtqueue, which is where the device state is saved from. While a live migration runs, `set_log`
makes the kernel log its writes into guest RAM (kvmpy.vhost.dirtylog).
"""
from __future__ import annotations

import bisect
import errno as E
import logging
import os
import struct
import threading
from typing import Protocol

from kvmpy.devices.virtio.queue import Virtqueue
from kvmpy.errors import DeviceError, KvmpyError
from kvmpy.ioctl import request_numbers as nr
from kvmpy.ioctl._fd import FdObject
from kvmpy.ioctl._kvm import ffi
from kvmpy.memslots import GuestMemory
from kvmpy.vhost.dirtylog import VHOST_VRING_F_LOG

log = logging.getLogger(__name__)

VHOST_NET_PATH = "/dev/vhost-net"
VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27   # vhost adds the header itself: not wanted, the TAP has one
VHOST_F_LOG_ALL = 1 << 26
RX, TX = 0, 1                          # vhost-net's vring numbers within one pair


class VhostNet(FdObject):
    """One /dev/vhost-net instance: the ioctls, each failing as IoctlError naming itself."""

    kind = "vhost-net"

    def __init__(self, path: str = VHOST_NET_PATH):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            hint = "load the vhost_net module (modprobe vhost_net)" if e.errno == E.ENOENT else None
            raise DeviceError(f"opening {path}", errno=e.errno, detail=hint) from None
        super().__init__(fd, path)

    def set_owner(self) -> None:
        self._call("VHOST_SET_OWNER", nr.VHOST_SET_OWNER)

    def get_features(self) -> int:
        out = ffi.new("__u64 *")
        self._call("VHOST_GET_FEATURES", nr.VHOST_GET_FEATURES, out)
        return int(out[0])

    def set_features(self, features: int) -> None:
        self._call("VHOST_SET_FEATURES", nr.VHOST_SET_FEATURES, ffi.new("__u64 *", features))

    def set_log_base(self, address: int) -> None:
        """The dirty log's userspace address (kvmpy.vhost.dirtylog: a bit per guest page)."""
        self._call("VHOST_SET_LOG_BASE", nr.VHOST_SET_LOG_BASE, ffi.new("__u64 *", address))

    def set_mem_table(self, regions: list[tuple[int, int, int]]) -> None:
        """(guest physical address, size, userspace address) per RAM range."""
        table = ffi.new("struct vhost_memory *", {"nregions": len(regions), "regions": len(regions)})
        for i, (gpa, size, hva) in enumerate(regions):
            r = table.regions[i]
            r.guest_phys_addr, r.memory_size, r.userspace_addr = gpa, size, hva
        self._call("VHOST_SET_MEM_TABLE", nr.VHOST_SET_MEM_TABLE, table)

    def _state(self, name: str, request: int, index: int, num: int = 0) -> int:
        s = ffi.new("struct vhost_vring_state *", {"index": index, "num": num})
        self._call(f"{name}({index})", request, s)
        return int(s.num)

    def set_vring_num(self, index: int, num: int) -> None:
        self._state("VHOST_SET_VRING_NUM", nr.VHOST_SET_VRING_NUM, index, num)

    def set_vring_base(self, index: int, base: int) -> None:
        self._state("VHOST_SET_VRING_BASE", nr.VHOST_SET_VRING_BASE, index, base)

    def get_vring_base(self, index: int) -> int:
        """The ring's next avail index; the kernel stops the ring to answer."""
        return self._state("VHOST_GET_VRING_BASE", nr.VHOST_GET_VRING_BASE, index) & 0xFFFF

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, flags: int = 0,
                       log_guest_addr: int = 0) -> None:
        """Userspace addresses of the ring's parts; flags 1 << VHOST_VRING_F_LOG logs the used
        ring's writes at guest-physical `log_guest_addr`."""
        a = ffi.new("struct vhost_vring_addr *", {"index": index, "flags": flags, "desc_user_addr": desc,
                                                   "used_user_addr": used, "avail_user_addr": avail,
                                                   "log_guest_addr": log_guest_addr})
        self._call(f"VHOST_SET_VRING_ADDR({index})", nr.VHOST_SET_VRING_ADDR, a)

    def _file(self, name: str, request: int, index: int, fd: int) -> None:
        f = ffi.new("struct vhost_vring_file *", {"index": index, "fd": fd})
        self._call(f"{name}({index})", request, f)

    def set_vring_kick(self, index: int, fd: int) -> None:
        self._file("VHOST_SET_VRING_KICK", nr.VHOST_SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int) -> None:
        self._file("VHOST_SET_VRING_CALL", nr.VHOST_SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int) -> None:
        self._file("VHOST_SET_VRING_ERR", nr.VHOST_SET_VRING_ERR, index, fd)

    def set_backend(self, index: int, fd: int) -> None:
        """NET_SET_BACKEND: the TAP fd for this vring, or -1 to detach (stops the ring)."""
        self._file("VHOST_NET_SET_BACKEND", nr.VHOST_NET_SET_BACKEND, index, fd)


class KernelPath(Protocol):
    """What the VMM's virtio wiring lends a kernel data path (kvmpy.machine.virtio)."""
    mem: GuestMemory

    def take_kick(self, queue: int) -> int: ...       # the notify ioeventfd, out of the event loop

    def release_kick(self, queue: int) -> None: ...

    def call_eventfd(self, queue: int) -> int: ...    # the queue's MSI-X irqfd (or a relay)

    def release_call(self, queue: int) -> None: ...


def host_address(mem: GuestMemory, gpa: int, length: int) -> int:
    """Userspace address of guest-physical [gpa, gpa+length), which must lie in one RAM range."""
    starts = [r.gpa for r in mem.ranges]
    i = bisect.bisect_right(starts, gpa) - 1
    if i < 0 or gpa + length > mem.ranges[i].gpa + mem.ranges[i].size:
        raise DeviceError("handing a ring to vhost-net", detail=f"[{gpa:#x}+{length}] is not inside guest RAM")
    return mem.host_address(i) + gpa - mem.ranges[i].gpa


class VhostNetOffload:
    """virtio-net's rx/tx rings in the kernel, one vhost-net instance per queue pair. Opened (and
    owned) at construction, so `vhost=on` fails at start-up when the kernel cannot do it."""

    def __init__(self, tap_fds: list[int], path: str = VHOST_NET_PATH):
        self.tap_fds = list(tap_fds)
        self.vhosts: list[VhostNet] = []
        self.path: KernelPath | None = None
        self._running: list[tuple[int, int, Virtqueue]] = []   # (pair, vring, queue)
        self._kicks: dict[int, int] = {}
        self._lock = threading.RLock()      # a migration's set_log against a guest's reset or a pause
        self._acked: int | None = None      # the features the guest and kvmpy agreed on (no LOG_ALL)
        self.log_address: int | None = None     # set_log's: the rings log their writes there
        try:
            for _ in tap_fds:
                v = VhostNet(path)
                self.vhosts.append(v)
                v.set_owner()
            self.features = self.vhosts[0].get_features()
        except Exception:
            self.close()
            raise

    def bind(self, path: KernelPath) -> None:
        """Called by the wiring once the virtio-pci function exists."""
        self.path = path

    def start(self, queues: list[Virtqueue], features: int, pairs: int) -> None:
        with self._lock:
            self._start(queues, features, pairs)

    def _start(self, queues: list[Virtqueue], features: int, pairs: int) -> None:
        path = self.path
        if path is None:
            raise DeviceError("starting vhost-net", detail="not bound to the VMM's wiring")
        mem = path.mem
        regions = [(r.gpa, r.size, mem.host_address(i)) for i, r in enumerate(mem.ranges)]
        self._acked = features & self.features & ~(VHOST_NET_F_VIRTIO_NET_HDR | VHOST_F_LOG_ALL)
        try:
            for pair in range(min(pairs, len(self.vhosts))):
                v = self.vhosts[pair]
                v.set_features(self._acked)
                v.set_mem_table(regions)
                if self.log_address is not None:    # a migration is running: keep logging (the kernel
                    v.set_log_base(self.log_address)    # checks the log against the memory table: after it)
                    v.set_features(self._features())
                for vring in (RX, TX):
                    q = queues[2 * pair + vring]
                    if not q.ready:
                        continue
                    self._start_ring(v, pair, vring, q, path, mem)
        except Exception:
            self._stop()
            raise
        log.info("vhost-net: %d ring(s) in the kernel", len(self._running))

    def _start_ring(self, v: VhostNet, pair: int, vring: int, q: Virtqueue, path: KernelPath,
                    mem: GuestMemory) -> None:
        size = q.size
        v.set_vring_num(vring, size)
        v.set_vring_base(vring, q.last_avail_idx)
        self._set_vring_addr(v, vring, q, mem)
        self._running.append((pair, vring, q))
        self._kicks[q.index] = kick = path.take_kick(q.index)   # a dup: ours until release_kick
        v.set_vring_kick(vring, kick)
        v.set_vring_call(vring, path.call_eventfd(q.index))
        v.set_backend(vring, self.tap_fds[pair])

    def _features(self) -> int:
        return (self._acked or 0) | (VHOST_F_LOG_ALL if self.log_address is not None else 0)

    def _set_vring_addr(self, v: VhostNet, vring: int, q: Virtqueue, mem: GuestMemory) -> None:
        size = q.size
        addresses = (host_address(mem, q.desc_addr, 16 * size), host_address(mem, q.used_addr, 6 + 8 * size),
                     host_address(mem, q.avail_addr, 6 + 2 * size))
        if self.log_address is None:
            v.set_vring_addr(vring, *addresses)
        else:
            v.set_vring_addr(vring, *addresses, 1 << VHOST_VRING_F_LOG, q.used_addr)

    def set_log(self, log_address: int | None) -> None:
        """Live migration's dirty log (kvmpy.vhost.dirtylog): from now on every vhost instance
        logs its writes into guest RAM at `log_address` (VHOST_SET_LOG_BASE, VHOST_F_LOG_ALL added
        to the acked features, the running rings' used rings with VHOST_VRING_F_LOG), or stops
        logging (None). Kept across stop/start: a pause or the guest's reset of the card during
        the migration restarts the rings still logging. Raises DeviceError when this kernel's
        vhost-net cannot log, IoctlError when an ioctl fails."""
        with self._lock:
            if log_address is not None and not self.features & VHOST_F_LOG_ALL:
                raise DeviceError("logging vhost-net's writes for the migration",
                                  detail="this kernel's vhost-net lacks VHOST_F_LOG_ALL; give the NIC vhost=off")
            self.log_address = log_address
            for v in self.vhosts:
                if log_address is not None:
                    v.set_log_base(log_address)
                if self._acked is not None:     # the rings ran at least once: features were set
                    v.set_features(self._features())
            if self.path is not None:
                for pair, vring, q in self._running:
                    self._set_vring_addr(self.vhosts[pair], vring, q, self.path.mem)

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        """Detach the TAP from every running ring and read its next index back into the queue;
        the used index is the one the kernel published in guest memory."""
        path = self.path
        for pair, vring, q in reversed(self._running):
            v = self.vhosts[pair]
            try:
                v.set_backend(vring, -1)
                q.last_avail_idx = v.get_vring_base(vring)
            except KvmpyError as e:
                log.warning("vhost-net: stopping ring %d of pair %d: %s", vring, pair, e)
            if path is not None:
                used = struct.unpack("<H", path.mem.read(q.used_addr + 2, 2))[0]
                q.used_idx = q.signalled_used = used
                path.release_kick(q.index)
                path.release_call(q.index)
        self._running = []
        self._kicks = {}

    def kick(self, queue_index: int) -> None:
        """A notify that arrived as an MMIO exit: pass it to the kernel's eventfd."""
        efd = self._kicks.get(queue_index)
        if efd is not None:
            os.eventfd_write(efd, 1)

    def close(self) -> None:
        self.stop()
        for v in self.vhosts:
            v.close()
        self.vhosts = []
