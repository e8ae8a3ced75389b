"""The in-process API's conveniences on a Machine: the captured console's handle, the device
table as a list, exit hooks that make a few lines of Python a device on the port or MMIO bus,
and snapshots (save, incoming, restore; kvmpy.machine.snapshot does the work).

A mixin of Machine (kept apart so lifecycle.py stays about run states); needs `serial_console`,
`board`, `memory`, `_lock` and `_port_hooks` from it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from kvmpy import sandbox
from kvmpy.errors import StateError
from kvmpy.machine.config import MachineConfig

if TYPE_CHECKING:
    from kvmpy.machine.lifecycle import Machine


class MachineApiMixin:
    @property
    def console(self):
        """The serial console's handle when it is captured (the API's default), else None."""
        from kvmpy.machine.console import CaptureConsole, GuestConsole
        if not isinstance(self.serial_console, CaptureConsole):
            return None
        if not hasattr(self, "_console_handle"):
            self._console_handle = GuestConsole(self.serial_console)
        return self._console_handle

    @property
    def devices(self) -> list:
        """The device table's rows (id, kind, device, bus ranges) of the running board."""
        board = self.board
        return list(board.devices) if board is not None else []

    def set_link(self, name: str, up: bool) -> bool:
        """QEMU's set_link for NIC `name` (its device id: "net0" for the first --nic): the guest
        sees its carrier change, and nothing passes while it is down. False when the machine has
        no such NIC. The setting outlives a reboot (the board's devices are rebuilt then; QEMU
        keeps a link down across resets), so it is remembered and applied to every new board."""
        with self._lock:
            if name not in {f"net{i}" for i in range(len(self.config.nics))}:
                return False
            links = self.__dict__.setdefault("_nic_links", {})
            links[name] = up
            self._apply_nic_links()
            return True

    def _apply_nic_links(self) -> None:
        board = self.board
        for name, up in self.__dict__.get("_nic_links", {}).items():
            entry = board.devices.get(name) if board is not None else None
            if entry is not None:
                getattr(entry.device, "device", entry.device).set_link(up)   # the PCI function wraps it

    def add_pio_hook(self, port: int, length: int = 1, read: Callable[[int, int], int] | None = None,
                     write: Callable[[int, int, int], None] | None = None) -> None:
        """Model a device in Python: guest port I/O in [port, port+length) calls
        `read(port, size) -> int` / `write(port, size, value)` on the vCPU's thread (keep them
        short: the vCPU waits). Unset callbacks read as all-ones and ignore writes, like an empty
        ISA port. Add hooks before start(); they survive reboots."""
        self._add_hook("pio", port, length, read, write, limit=0x10000)

    def add_mmio_hook(self, address: int, length: int, read: Callable[[int, int], int] | None = None,
                      write: Callable[[int, int, int], None] | None = None) -> None:
        """Like add_pio_hook for guest-physical addresses outside RAM (e.g. in 0xD0000000..,
        below the PCI BAR window): accesses there exit to kvmpy."""
        if self.memory is not None and any(r.gpa < address + length and address < r.end for r in self.memory.ranges):
            raise StateError("adding an MMIO hook", detail=f"{address:#x}+{length:#x} overlaps guest RAM")
        self._add_hook("mmio", address, length, read, write, limit=1 << 52)

    def _add_hook(self, bus: str, base: int, length: int, read, write, limit: int) -> None:
        from kvmpy.machine.hooks import HookDevice
        with self._lock:
            if self.board is not None:
                raise StateError(f"adding a {bus} hook", detail="add hooks before start()")
            if not (0 <= base and 0 < length and base + length <= limit):
                raise StateError(f"adding a {bus} hook", detail=f"{base:#x}+{length:#x} is outside the {bus} space")
            self._port_hooks.append((bus, base, length, HookDevice(base, read, write)))

    def _apply_port_hooks(self) -> None:
        from kvmpy.machine.devices import BusRange
        for bus, base, length, device in self._port_hooks:
            getattr(self.board, bus).register(base, length, device)
            self.board.devices.add(f"hook-{bus}-{base:x}", "python-hook", device, [BusRange(bus, base, length)])
        self._apply_nic_links()     # a rebuilt board (a reboot) keeps the links set down

    # -- snapshots (kvmpy.machine.snapshot does the work) -----------------------------------------
    def save(self, uri: str) -> None:
        """Write the whole machine to `uri` (file:PATH or exec:CMD). A running machine is paused
        first; afterwards it is postmigrate (resume() continues it, as QEMU's cont). On any
        error the machine goes back to running if it was, and the error is raised."""
        from kvmpy.machine.snapshot import save_machine
        save_machine(self, uri)

    def incoming(self, uri: str) -> None:
        """Restore the machine from `uri` (QEMU's --incoming): only from the inmigrate state,
        before any vCPU exists; runs it afterwards unless the config says paused (-S)."""
        from kvmpy.machine.snapshot import restore_machine
        sandbox.adopt(self.confinement.policy)
        restore_machine(self, uri)

    @classmethod
    def restore(cls, uri: str, config: MachineConfig | None = None, **kwargs: Any) -> "Machine":
        """A new Machine restored from `uri`, with the same configuration arguments as the saved one."""
        if config is None:
            config = MachineConfig.from_kwargs(incoming=uri, **kwargs)
        config.incoming = uri
        m = cls(config)
        try:
            m.incoming(uri)
        except BaseException:
            m.close()
            raise
        return m
