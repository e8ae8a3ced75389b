"""`--drive` specifications, apart from the device so the CLI and config parse them without
importing virtio-blk (start-up time: the nested harness runs Python ~30x slower)."""
from __future__ import annotations

from dataclasses import dataclass

from kvmpy.errors import ConfigError
from kvmpy.options import split_options

ID_BYTES = 20               # virtio-blk GET_ID answer: the serial, NUL-padded
CACHE_MODES = ("writeback", "none")


@dataclass(frozen=True)
class DriveSpec:
    file: str
    readonly: bool = False
    serial: str = ""
    cache: str = "writeback"    # or "none": O_DIRECT for aligned requests


def parse_drive_spec(text: str) -> DriveSpec:
    """'file=disk.img[,readonly=on][,serial=...][,cache=none]' -> DriveSpec (raises ConfigError).
    A comma inside a value is written ",," as in QEMU."""
    opts: dict[str, str] = {}
    for part in split_options(text):
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError("parsing --drive", detail=f"{part!r} is not key=value")
        if key not in ("file", "readonly", "serial", "format", "if", "cache"):
            raise ConfigError("parsing --drive", detail=f"unknown option {key!r}")
        if key in opts:
            raise ConfigError("parsing --drive", detail=f"{key}= is given twice")
        opts[key] = value
    if not opts.get("file"):
        raise ConfigError("parsing --drive", detail=f"{text!r} has no file=")
    if opts.get("format", "raw") != "raw" or opts.get("if", "virtio") != "virtio":
        raise ConfigError("parsing --drive", detail="only format=raw and if=virtio are supported")
    ro = opts.get("readonly", "off").lower()
    if ro not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
        raise ConfigError("parsing --drive", detail=f"readonly={ro!r} is not on/off")
    serial = opts.get("serial", "")
    if len(serial.encode()) > ID_BYTES:
        raise ConfigError("parsing --drive", detail=f"serial {serial!r} is longer than {ID_BYTES} bytes")
    cache = opts.get("cache", "writeback")
    if cache not in CACHE_MODES:
        raise ConfigError("parsing --drive", detail=f"cache={cache!r} is not one of {', '.join(CACHE_MODES)}")
    return DriveSpec(opts["file"], ro in ("on", "true", "yes", "1"), serial, cache)
