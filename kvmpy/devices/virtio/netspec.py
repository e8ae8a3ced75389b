"""`--nic` specifications (QEMU's `-nic` shorthand), apart from the device so the CLI and config
parse them without importing virtio-net (start-up time: the nested harness runs Python slowly).

    --nic tap[,ifname=NAME][,br=BRIDGE][,mac=MAC][,vhost=on|off|auto][,queues=N]

Values follow QEMU's option syntax: a comma inside a value is written `,,`.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from kvmpy.errors import ConfigError
from kvmpy.options import split_options as split_qemu_options

IFNAMSIZ = 16                  # <linux/if.h>: names hold at most 15 bytes and a NUL
MAX_QUEUE_PAIRS = 8            # virtio-net multi-queue pairs kvmpy offers (QEMU allows more)
VHOST_MODES = ("on", "off", "auto")
_MAC_RE = re.compile(r"^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$")
_OPTIONS = ("ifname", "br", "mac", "vhost", "queues", "model", "id")


@dataclass(frozen=True)
class NicSpec:
    """One guest network card: a virtio-net-pci function backed by a TAP.

    `ifname` empty means kvmpy creates a TAP with a kernel-chosen name; `vhost` is "auto" (use
    /dev/vhost-net when it can be opened, else userspace with one log line), "on" (fail without
    it) or "off"."""
    ifname: str = ""
    bridge: str = ""
    mac: str = ""
    vhost: str = "auto"
    queues: int = 1

    def mac_bytes(self) -> bytes:
        return bytes(int(part, 16) for part in self.mac.split(":"))


def default_mac(seed: str, index: int) -> str:
    """A stable, locally administered, unicast MAC for NIC `index` of the VM named by `seed`:
    52:54:00 (QEMU's prefix, which has the locally administered bit set) and three bytes of a
    hash, so the same VM gets the same address on every boot and two VMs rarely collide."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def check_mac(mac: str) -> str:
    """Canonical lower-case form of `mac`, or ConfigError for a malformed or multicast one."""
    if not _MAC_RE.match(mac):
        raise ConfigError("parsing --nic", detail=f"mac={mac!r} is not six hex bytes like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise ConfigError("parsing --nic", detail=f"mac={mac} is a multicast address (first byte odd)")
    if mac.replace(":", "") == "000000000000":
        raise ConfigError("parsing --nic", detail="mac=00:00:00:00:00:00 is not a station address")
    return mac.lower()


def _check_ifname(key: str, name: str) -> str:
    if not name or len(name.encode()) >= IFNAMSIZ or "/" in name or any(c.isspace() for c in name) \
            or name in (".", ".."):
        raise ConfigError("parsing --nic", detail=f"{key}={name!r} is not a valid interface name "
                                                  f"(1-{IFNAMSIZ - 1} bytes, no '/' or spaces)")
    return name


def parse_nic_spec(text: str, index: int = 0, seed: str = "kvmpy") -> NicSpec:
    """'tap[,ifname=..][,br=..][,mac=..][,vhost=..][,queues=N]' -> NicSpec (raises ConfigError).

    `index` and `seed` choose the default MAC when none is given (see default_mac)."""
    parts = split_qemu_options(text)
    kind, rest = parts[0], parts[1:]
    if "=" in kind:  # QEMU accepts the type only as the first, bare word
        raise ConfigError("parsing --nic", detail=f"{text!r} must start with the backend type (tap)")
    if kind != "tap":
        raise ConfigError("parsing --nic", detail=f"backend {kind!r} is not supported (only tap)")
    opts: dict[str, str] = {}
    for part in rest:
        if not part:
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ConfigError("parsing --nic", detail=f"{part!r} is not key=value")
        if key not in _OPTIONS:
            raise ConfigError("parsing --nic", detail=f"unknown option {key!r} (known: {', '.join(_OPTIONS)})")
        if key in opts:
            raise ConfigError("parsing --nic", detail=f"option {key!r} given twice")
        opts[key] = value
    if opts.get("model", "virtio-net-pci") not in ("virtio", "virtio-net-pci"):
        raise ConfigError("parsing --nic", detail=f"model={opts['model']!r}: only virtio-net-pci is emulated")
    ifname = _check_ifname("ifname", opts["ifname"]) if "ifname" in opts else ""
    bridge = _check_ifname("br", opts["br"]) if "br" in opts else ""
    vhost = opts.get("vhost", "auto").lower()
    if vhost not in VHOST_MODES:
        raise ConfigError("parsing --nic", detail=f"vhost={vhost!r} is not one of {', '.join(VHOST_MODES)}")
    try:
        queues = int(opts.get("queues", "1"), 10)
    except ValueError:
        raise ConfigError("parsing --nic", detail=f"queues={opts['queues']!r} is not a number") from None
    if not 1 <= queues <= MAX_QUEUE_PAIRS:
        raise ConfigError("parsing --nic", detail=f"queues={queues} is not in 1..{MAX_QUEUE_PAIRS}")
    mac = check_mac(opts["mac"]) if "mac" in opts else default_mac(ifname or seed, index)
    return NicSpec(ifname, bridge, mac, vhost, queues)
