"""The stock Debian 6.1 kernel package: fetch it, unpack it, pull the ELF vmlinux out of the
bzImage and resolve module dependencies.

Both L1 (the nested hardware-KVM host, booted under TCG) and the tier-2 L2 guests use this one
package, so modules always match the running kernel. TCG decompressing a bzImage costs seconds,
hence the extracted ELF vmlinux (it carries a PVH note QEMU's -kernel accepts).
"""
from __future__ import annotations

import hashlib
import logging
import lzma
import os
import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmpy.errors import NestedError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_PATTERN = re.compile(r"^linux-image-(6\.1\.0-\d+-amd64)_[^_]+_amd64\.deb$")
META_PACKAGE = "linux-image-amd64"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_GZIP_MAGIC = b"\x1f\x8b\x08"


def cache_root() -> Path:
    """Everything downloaded or built lives here (ignored by git; shared read-write into L1)."""
    return Path(os.environ.get("KVMPY_CACHE", REPO_ROOT / ".cache")) / "nested"


@dataclass(frozen=True)
class KernelPackage:
    """One unpacked linux-image package: paths a harness or a test needs."""

    release: str          # e.g. "6.1.0-56-amd64"
    root: Path            # unpacked package tree
    bzimage: Path
    vmlinux: Path         # ELF with a PVH entry note, extracted from the bzImage
    config: Path

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    def config_value(self, option: str) -> str | None:
        """`y`, `m`, a string, or None when the option is unset."""
        for line in self.config.read_text().splitlines():
            if line.startswith(option + "="):
                return line.split("=", 1)[1]
        return None


def _run(argv: list[str], context: str, cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as e:
        raise NestedError(context, errno=e.errno, detail=f"{argv[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise NestedError(context, detail=f"{argv[0]} timed out") from e
    if proc.returncode != 0:
        raise NestedError(context, detail=f"{' '.join(argv)} exited {proc.returncode}: "
                                          f"{proc.stderr.strip()[-500:]}")
    return proc.stdout


def _cached_debs(deb_dir: Path) -> list[Path]:
    if not deb_dir.is_dir():
        return []
    return sorted((p for p in deb_dir.iterdir() if PACKAGE_PATTERN.match(p.name)),
                  key=lambda p: int(PACKAGE_PATTERN.match(p.name).group(1).split("-")[1]))


def _kernel_package_names() -> list[str]:
    try:
        deps = _run(["apt-cache", "depends", META_PACKAGE], "resolving the Debian kernel package")
    except NestedError:
        return []
    return re.findall(r"Depends:\s*(linux-image-6\.1\.0-\d+-amd64)\b", deps)


def fetch_deb(deb_dir: Path | None = None) -> Path:
    """The newest cached kernel .deb, or download the one linux-image-amd64 depends on.

    A cached package is preferred so runs stay reproducible (and L1, which has no network,
    sees the same file). KVMPY_KERNEL_DEB names an explicit file.
    """
    explicit = os.environ.get("KVMPY_KERNEL_DEB")
    if explicit:
        path = Path(explicit)
        if not PACKAGE_PATTERN.match(path.name) or not path.is_file():
            raise NestedError("using KVMPY_KERNEL_DEB", detail=f"{path} is not a "
                              "linux-image-6.1.0-*-amd64 .deb")
        return path
    deb_dir = deb_dir or cache_root() / "deb"
    cached = _cached_debs(deb_dir)
    if cached:
        return cached[-1]
    names = _kernel_package_names()
    if not names:
        # A fresh machine may have empty package lists: refresh them once and ask again.
        _run(["apt-get", "update", "-qq"], "refreshing the package lists (apt-get update)")
        names = _kernel_package_names()
    if not names:
        raise NestedError("resolving the Debian kernel package",
                          detail=f"{META_PACKAGE} does not depend on a 6.1 kernel here")
    deb_dir.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s into %s", names[0], deb_dir)
    _run(["apt-get", "download", names[0]], f"downloading {names[0]}", cwd=deb_dir)
    cached = _cached_debs(deb_dir)
    if not cached:
        raise NestedError(f"downloading {names[0]}", detail="apt-get left no .deb behind")
    return cached[-1]


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF kernel inside a bzImage's compressed payload (boot protocol >= 2.08)."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        raise NestedError("extracting vmlinux", detail="not a bzImage (no HdrS header)")
    version, = struct.unpack_from("<H", bzimage, 0x206)
    if version < 0x208:
        raise NestedError("extracting vmlinux", detail=f"boot protocol {version:#x} < 2.08")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start:start + payload_length]
    if len(payload) != payload_length:
        raise NestedError("extracting vmlinux", detail="payload runs past the end of the file")
    if payload.startswith(_XZ_MAGIC):
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(_GZIP_MAGIC):
        import zlib
        elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        raise NestedError("extracting vmlinux",
                          detail=f"unsupported payload compression {payload[:6].hex()}")
    if not elf.startswith(b"\x7fELF"):
        raise NestedError("extracting vmlinux", detail="payload is not an ELF image")
    return elf


def unpack(deb: Path | None = None) -> KernelPackage:
    """Unpack the kernel package (once per .deb content) and extract its vmlinux."""
    deb = deb or fetch_deb()
    match = PACKAGE_PATTERN.match(deb.name)
    if not match:
        raise NestedError("unpacking the kernel package", detail=f"unexpected name {deb.name}")
    release = match.group(1)
    stat = deb.stat()
    key = hashlib.sha256(f"{deb.name}:{stat.st_size}".encode()).hexdigest()[:12]
    root = cache_root() / "kernel" / f"{release}-{key}"
    done = root / ".unpacked"
    if not done.exists():
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _run(["dpkg-deb", "-x", str(deb), str(tmp)], f"unpacking {deb.name}")
        bz = tmp / "boot" / f"vmlinuz-{release}"
        (tmp / "boot" / "vmlinux").write_bytes(extract_vmlinux(bz.read_bytes()))
        (tmp / ".unpacked").write_text(deb.name + "\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    return KernelPackage(release=release, root=root,
                         bzimage=root / "boot" / f"vmlinuz-{release}",
                         vmlinux=root / "boot" / "vmlinux",
                         config=root / "boot" / f"config-{release}")


def modinfo_depends(ko: bytes) -> list[str]:
    """Names in a module's `.modinfo depends=` entry, read from its ELF section table."""
    try:
        return _modinfo_depends(ko)
    except (struct.error, ValueError, IndexError) as e:
        raise NestedError("reading module info", detail=f"malformed ELF: {e}") from e


def _modinfo_depends(ko: bytes) -> list[str]:
    if ko[:4] != b"\x7fELF" or ko[4] != 2:
        raise NestedError("reading module info", detail="not an ELF64 module")
    shoff, = struct.unpack_from("<Q", ko, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", ko, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, off, size = struct.unpack_from("<IIQQQQ", ko, shoff + i * shentsize)
        return name, off, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name_off, off, size = section(i)
        end = ko.index(b"\0", stroff + name_off)
        if ko[stroff + name_off:end] == b".modinfo":
            for entry in ko[off:off + size].split(b"\0"):
                if entry.startswith(b"depends="):
                    value = entry[len(b"depends="):].decode()
                    return [d for d in value.split(",") if d]
            return []
    raise NestedError("reading module info", detail="module has no .modinfo section")


def module_index(modules_dir: Path) -> dict[str, Path]:
    """Module name (dashes as underscores) -> .ko path."""
    index: dict[str, Path] = {}
    order = modules_dir / "modules.order"
    # modules.order names every module: far cheaper than a tree walk over 9p inside L1.
    candidates = ([modules_dir / line for line in order.read_text().split()]
                  if order.exists() else list((modules_dir / "kernel").rglob("*.ko*")))
    for ko in candidates:
        name = ko.name.split(".ko")[0].replace("-", "_")
        index[name] = ko
    return index


def resolve_modules(pkg: KernelPackage, wanted: list[str]) -> list[Path]:
    """The wanted modules and all their dependencies, dependencies first (insmod order).

    Names built into the kernel (modules.builtin) are dropped: nothing to load.
    """
    index = module_index(pkg.modules_dir)
    builtin_file = pkg.modules_dir / "modules.builtin"
    builtin = {Path(l).name.split(".ko")[0].replace("-", "_")
               for l in builtin_file.read_text().split()} if builtin_file.exists() else set()
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in chain:
            raise NestedError("resolving module dependencies", detail=f"cycle at {name}")
        if name not in index:
            raise NestedError("resolving module dependencies",
                              detail=f"module {name} not found in {pkg.release}")
        ko = index[name]
        data = ko.read_bytes()
        if ko.name.endswith(".xz"):
            data = lzma.decompress(data)
        for dep in modinfo_depends(data):
            visit(dep, chain + (name,))
        seen.add(name)
        order.append(ko)

    for name in wanted:
        visit(name, ())
    return order
