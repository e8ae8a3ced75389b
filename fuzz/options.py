"""The CLI's option parsers, fed arbitrary text: QEMU's comma syntax (kvmpy/options.py) and
every parser built on it or beside it: --drive, --nic, --serial/--virtio-console, --fw-cfg,
--device, -m, --incoming/migrate URIs, --qmp specs, --initrd module lists and `kvmpy qmp`'s
key=value arguments. None opens a file or socket, so each runs on any text. Oracle: only
KvmpyError (ConfigError, MigrationError, BootError) escapes, and split_options inverts QEMU's
escaping: joining the parts with ',' after doubling their commas gives the text back.
"""
from __future__ import annotations

import common

with common.instrumented():
    from kvmpy.boot.image import initrd_modules
    from kvmpy.cli.qmp import parse_assignments
    from kvmpy.devices.console import parse_console_spec
    from kvmpy.devices.fw_cfg import parse_fw_cfg_spec
    from kvmpy.devices.virtio.drive import parse_drive_spec
    from kvmpy.devices.virtio.netspec import parse_nic_spec
    from kvmpy.errors import KvmpyError
    from kvmpy.machine.config import parse_device_args
    from kvmpy.memslots.layout import parse_size
    from kvmpy.migrate.uri import parse_uri
    from kvmpy.monitor.spec import parse_qmp_spec, parse_server_spec
    from kvmpy.options import split_options

import atheris

PARSERS = [
    ("drive", parse_drive_spec),
    ("nic", parse_nic_spec),
    ("console", parse_console_spec),
    ("fw-cfg", parse_fw_cfg_spec),
    ("device", parse_device_args),
    ("memory", parse_size),
    ("uri", parse_uri),
    ("qmp", parse_qmp_spec),
    ("qmp-server", parse_server_spec),
    ("initrd", initrd_modules),
    ("qmp-args", lambda text: parse_assignments(text.split(" "))),
]
PREFIXES = ["", "file=", "tap,", "file:", "unix:", "name=opt/", "isa-debug-exit,", "exec:", "tcp:", "fd:"]


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    which = fdp.ConsumeIntInRange(0, len(PARSERS) - 1)
    prefix = PREFIXES[fdp.ConsumeIntInRange(0, len(PREFIXES) - 1)]
    text = prefix + fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    parts = split_options(text)
    if ",".join(p.replace(",", ",,") for p in parts) != text:
        raise AssertionError(f"split_options({text!r}) = {parts!r} does not give the text back")
    try:
        PARSERS[which][1](text)
    except KvmpyError:
        pass


def seeds() -> common.Seeds:
    texts = ["file=disk.img,readonly=on,serial=SN1,cache=none", "tap,ifname=tap0,br=br0,mac=52:54:00:12:34:56,vhost=on,queues=2",
             "file:/tmp/log", "name=opt/x,string=hello", "isa-debug-exit,iobase=0xf4,iosize=0x04", "512M", "exec:cat x",
             "unix:/tmp/q.sock,server=on,wait=off", "tcp:127.0.0.1:4444,server", "a.bin args,b.bin", "uri=file:/x a.b=1"]
    for i, text in enumerate(texts):
        yield bytes([i, 0]) + text.encode()


if __name__ == "__main__":
    common.main(test_one_input, seeds)
