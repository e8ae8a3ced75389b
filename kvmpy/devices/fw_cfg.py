"""QEMU's firmware configuration device (fw_cfg) on x86's I/O ports, for test kernels written for QEMU.

Layout (QEMU's docs/specs/fw_cfg.rst): a 16-bit write to 0x510 selects an item and rewinds it;
byte reads from 0x511 (or 0x510) return the item's next byte (zeros past its end); 0x514..0x51b
is the DMA interface: the guest writes the guest-physical address of a FWCfgDmaAccess (big-endian
{u32 control; u32 length; u64 address}) as two big-endian 32-bit halves, high at 0x514 and low at
0x518 (the low write starts the transfer); reading it gives the signature "QEMU CFG".

Items: the signature "QEMU" (key 0x0), the feature ID (traditional + DMA), a zero UUID, the RAM
size, "no graphics", the CPU counts, the file directory (0x19: a big-endian count, then 64-byte
entries {u32 size, u16 select, u16 reserved, char name[56]}) and the files from
`--fw-cfg name=opt/NAME,file=PATH|string=TEXT` (keys from 0x20, in name order, as QEMU sorts them).

The items are configuration (a migration destination is given the same --fw-cfg); the state is
where the guest is reading: selector, offset, and a DMA high half written but not yet its low half.
The guest controls every access: out-of-RAM DMA sets the error bit, nothing is ever written
outside guest RAM, and an item is read-only (a DMA write sets the error bit, as for QEMU's
read-only items).
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from kvmpy.options import split_options
from kvmpy.errors import ConfigError, GuestMemoryError, StateError
from kvmpy.ratelimit import RateLimitedLog
from kvmpy.state import expect_state, versioned

if TYPE_CHECKING:
    from kvmpy.memslots import GuestMemory

log = logging.getLogger(__name__)
_guest_log = RateLimitedLog(log)

FW_CFG_PORT = 0x510            # selector (16-bit write); data at +1
FW_CFG_PORT_SPAN = 12          # 0x510..0x51b: selector, data, two reserved, the DMA address
DMA_OFFSET = 4                 # 0x514
DMA_SIGNATURE = b"QEMU CFG"

FW_CFG_SIGNATURE, FW_CFG_ID, FW_CFG_UUID, FW_CFG_RAM_SIZE = 0x00, 0x01, 0x02, 0x03
FW_CFG_NOGRAPHIC, FW_CFG_NB_CPUS, FW_CFG_MAX_CPUS = 0x04, 0x05, 0x0F
FW_CFG_FILE_DIR, FW_CFG_FILE_FIRST = 0x19, 0x20
FW_CFG_WRITE_CHANNEL, FW_CFG_ARCH_LOCAL = 0x4000, 0x8000
FEATURE_TRADITIONAL, FEATURE_DMA = 1, 2
DMA_ERROR, DMA_READ, DMA_SKIP, DMA_SELECT, DMA_WRITE = 0x01, 0x02, 0x04, 0x08, 0x10
DMA_ACCESS = struct.Struct(">IIQ")
FILE_NAME_BYTES = 56           # including the terminating NUL
MAX_FILE_BYTES = 64 << 20      # an item is held in host memory: refuse what no test needs
MAX_FILES = 0x4000 - FW_CFG_FILE_FIRST
ZERO_CHUNK = 1 << 20           # DMA reads past an item's end zero guest RAM this much at a time


@dataclass(frozen=True)
class FwCfgSpec:
    """One `--fw-cfg name=opt/NAME,file=PATH` or `,string=TEXT` (exactly one of the two)."""
    name: str
    file: str | None = None
    string: str | None = None


def parse_fw_cfg_spec(text: str) -> FwCfgSpec:
    """QEMU's -fw_cfg syntax (`,,` is a literal comma)."""
    opts: dict[str, str] = {}
    for part in split_options(text):
        key, sep, value = part.partition("=")
        if not part:
            continue
        if key not in ("name", "file", "string") or not sep:
            raise ConfigError("parsing --fw-cfg", detail=f"{part!r}: expected name=, file= or string=")
        if key in opts:
            raise ConfigError("parsing --fw-cfg", detail=f"{key}= is given twice")
        opts[key] = value
    name = opts.get("name", "")
    if not name:
        raise ConfigError("parsing --fw-cfg", detail=f"{text!r} has no name=")
    if len(name.encode()) >= FILE_NAME_BYTES:
        raise ConfigError("parsing --fw-cfg", detail=f"name {name!r} is longer than {FILE_NAME_BYTES - 1} bytes")
    if ("file" in opts) == ("string" in opts):
        raise ConfigError("parsing --fw-cfg", detail=f"{name}: give exactly one of file= and string=")
    if "file" in opts and not opts["file"]:
        raise ConfigError("parsing --fw-cfg", detail=f"{name}: file= needs a path")
    if not name.startswith("opt/"):
        log.warning("--fw-cfg name %r: names given by users should start with opt/ (QEMU's rule)", name)
    return FwCfgSpec(name, opts.get("file"), opts.get("string"))


def check_fw_cfg_specs(specs: list[FwCfgSpec]) -> None:
    """Names are unique and there are not more files than keys."""
    names = [s.name for s in specs]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError("checking --fw-cfg", detail=f"the name {name!r} is given twice")
    if len(specs) > MAX_FILES:
        raise ConfigError("checking --fw-cfg", detail=f"{len(specs)} files; at most {MAX_FILES}")


def load_fw_cfg_files(specs: list[FwCfgSpec]) -> list[tuple[str, bytes]]:
    """(name, contents) for each spec: string= as its UTF-8 bytes (no NUL, as QEMU), file= read whole."""
    out = []
    for spec in specs:
        if spec.string is not None:
            out.append((spec.name, spec.string.encode()))
            continue
        try:
            size = os.stat(spec.file).st_size
            if size > MAX_FILE_BYTES:
                raise ConfigError(f"reading --fw-cfg file {spec.file!r}",
                                  detail=f"{size} bytes; at most {MAX_FILE_BYTES}")
            with open(spec.file, "rb") as f:
                out.append((spec.name, f.read(MAX_FILE_BYTES + 1)[:MAX_FILE_BYTES]))
        except OSError as e:
            raise ConfigError(f"reading --fw-cfg file {spec.file!r}", errno=e.errno) from None
    return out


def build_items(ram_size: int, cpus: int, files: list[tuple[str, bytes]]) -> dict[int, bytes]:
    """Every item a guest can select, by key."""
    items = {
        FW_CFG_SIGNATURE: b"QEMU",
        FW_CFG_ID: struct.pack("<I", FEATURE_TRADITIONAL | FEATURE_DMA),
        FW_CFG_UUID: bytes(16),
        FW_CFG_RAM_SIZE: struct.pack("<Q", ram_size),
        FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
        FW_CFG_NB_CPUS: struct.pack("<H", cpus),
        FW_CFG_MAX_CPUS: struct.pack("<H", cpus),
    }
    directory = bytearray(struct.pack(">I", len(files)))
    for i, (name, data) in enumerate(sorted(files)):
        key = FW_CFG_FILE_FIRST + i
        items[key] = data
        directory += struct.pack(">IHH", len(data), key, 0) + name.encode().ljust(FILE_NAME_BYTES, b"\0")
    items[FW_CFG_FILE_DIR] = bytes(directory)
    return items


@versioned("fw_cfg", 1)
@dataclass
class FwCfgState:
    """Where the guest is reading: the selected key, the offset in it, and a DMA high half written
    but not yet followed by its low half."""
    selector: int = 0
    offset: int = 0
    dma_high: int = 0


class FwCfg:
    """The device over the 12 ports at 0x510 (QEMU's fw_cfg_io); DMA reaches guest RAM through `mem`."""

    DEVICE_KIND: ClassVar[str] = "fw_cfg_io"

    def __init__(self, mem: "GuestMemory", items: dict[int, bytes]):
        self.mem = mem
        self.items = items
        self._lock = threading.Lock()
        self._selector = 0
        self._offset = 0
        self._dma_high = 0

    def __repr__(self) -> str:
        return f"FwCfg({len(self.items)} items)"

    # -- port I/O ----------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset >= DMA_OFFSET:
            start = offset - DMA_OFFSET
            return DMA_SIGNATURE[start:start + size].ljust(size, b"\xff")
        if offset + size > 2:
            return b"\xff" * size
        with self._lock:
            return self._read_data(size)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) == 2:
            with self._lock:
                self._select(int.from_bytes(data, "little"))
        elif offset == DMA_OFFSET and len(data) == 4:
            with self._lock:
                self._dma_high = int.from_bytes(data, "big")
        elif offset == DMA_OFFSET + 4 and len(data) == 4:
            with self._lock:
                address = (self._dma_high << 32) | int.from_bytes(data, "big")
                self._dma_high = 0
                self._dma(address)
        else:   # data-register writes are obsolete in QEMU too; anything else is a guest's mistake
            _guest_log.debug(("fw_cfg", "write"), "fw_cfg: ignored %d-byte write at +%d", len(data), offset)

    # -- the item cursor (callers hold the lock) -----------------------------------------------------
    def _select(self, key: int) -> None:
        self._selector = key & 0xFFFF
        self._offset = 0

    def _item(self) -> bytes:
        return self.items.get(self._selector & ~FW_CFG_WRITE_CHANNEL, b"")

    def _read_data(self, size: int) -> bytes:
        item = self._item()
        chunk = item[self._offset:self._offset + size]
        self._offset = min(self._offset + size, len(item))
        return chunk.ljust(size, b"\0")

    # -- DMA -----------------------------------------------------------------------------------------
    def _dma(self, address: int) -> None:
        try:
            control, length, target = DMA_ACCESS.unpack(self.mem.read(address, DMA_ACCESS.size))
        except GuestMemoryError:
            _guest_log.warning(("fw_cfg", "dma-access"), "fw_cfg: DMA access structure at %#x is not in RAM", address)
            return
        if control & DMA_SELECT:
            self._select(control >> 16)
        failed = False
        if control & DMA_WRITE:
            failed = True                              # every item is read-only
        elif control & DMA_READ:
            failed = not self._dma_read(target, length)
        elif control & DMA_SKIP:
            self._offset = min(self._offset + length, len(self._item()))
        try:
            self.mem.write(address, struct.pack(">I", DMA_ERROR if failed else 0))
        except GuestMemoryError:
            pass   # read a moment ago: only a concurrent RAM change could get here

    def _dma_read(self, target: int, length: int) -> bool:
        if length == 0:
            return True
        if not self.mem.contains(target, length):
            return False
        item = self._item()
        data = item[self._offset:self._offset + length]
        self.mem.write(target, data)
        self._offset += len(data)
        done = len(data)
        while done < length:                       # past the item's end: zeros, as QEMU
            n = min(ZERO_CHUNK, length - done)
            self.mem.fill(target + done, n, 0)
            done += n
        return True

    # -- state -----------------------------------------------------------------------------------------
    def state(self) -> FwCfgState:
        with self._lock:
            return FwCfgState(self._selector, self._offset, self._dma_high)

    def check_state(self, state: object) -> FwCfgState:
        """Validate `state` (possibly from an untrusted stream) against this device's items."""
        checked = expect_state(state, FwCfgState, "fw_cfg state")
        for name, limit in (("selector", 0xFFFF), ("dma_high", 0xFFFF_FFFF)):
            value = getattr(checked, name)
            if type(value) is not int or not 0 <= value <= limit:
                raise StateError("restoring fw_cfg state", detail=f"{name}={value!r}")
        item = self.items.get(checked.selector & ~FW_CFG_WRITE_CHANNEL, b"")
        if type(checked.offset) is not int or not 0 <= checked.offset <= len(item):
            raise StateError("restoring fw_cfg state",
                             detail=f"offset={checked.offset!r} is outside the selected item ({len(item)} bytes)")
        return checked

    def restore(self, state: FwCfgState) -> None:
        checked = self.check_state(state)
        with self._lock:
            self._selector, self._offset, self._dma_high = checked.selector, checked.offset, checked.dma_high
