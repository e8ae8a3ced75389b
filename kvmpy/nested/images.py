"""Guest images built from the Debian kernel package and busybox-static: initramfs (cpio newc,
gzip) for L1 and for tier-2 guests, and ext4 disk images (mkfs.ext4 -d).

Each image is cached under .cache/nested/images/ named by a hash of all its inputs (builder
version, init script, busybox and module contents, extra files), so a changed input rebuilds it
and an unchanged one costs a hash.
"""
from __future__ import annotations

import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

from kvmpy.errors import NestedError
from kvmpy.nested import initscripts
from kvmpy.nested.cpio import CpioArchive
from kvmpy.nested.kernel import KernelPackage, cache_root, resolve_modules

log = logging.getLogger(__name__)

BUILDER_VERSION = "1"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
GUEST_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "virtio_console", "virtio_rng",
                 "ext4", "crc32c_generic")
L1_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay",
              "kvm_amd", "tun", "vhost_net", "virtio_net", "virtio_blk", "bridge", "veth")
FileSource = bytes | str | Path


def images_dir() -> Path:
    return cache_root() / "images"


def find_busybox() -> Path:
    """A static busybox (a dynamic one would need its libraries in the image)."""
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        if path.is_file():
            with path.open("rb") as f:
                head = f.read(4096)
            if b"/lib64/ld-linux" in head or b"ld-linux-x86-64" in head:
                continue
            return path
    raise NestedError("finding busybox", detail="no static busybox; install busybox-static")


def _content(source: FileSource) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str):
        return source.encode()
    try:
        return Path(source).read_bytes()
    except OSError as e:
        raise NestedError("reading an image input", errno=e.errno, detail=str(source)) from e


def _store(kind: str, digest: str, suffix: str, payload: bytes) -> Path:
    """Write atomically so parallel builders (host and L1 share the cache) never see halves."""
    out = images_dir() / f"{kind}-{digest[:16]}{suffix}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o644)
        f.write(payload)
    os.replace(tmp, out)
    return out


def _quick_key(kernel: KernelPackage, busybox: Path, init_script: str,
               modules: tuple[str, ...] | list[str], extra: Mapping[str, bytes]) -> str:
    st = busybox.stat()
    h = hashlib.sha256(f"{BUILDER_VERSION}\0{kernel.root}\0{busybox}\0{st.st_size}\0"
                       f"{st.st_mtime_ns}\0{init_script}\0{','.join(modules)}\0".encode())
    for path in sorted(extra):
        h.update(path.encode() + b"\0" + hashlib.sha256(extra[path]).digest())
    return "q" + h.hexdigest()[:15]


def build_initramfs(kernel: KernelPackage, init_script: str,
                    modules: tuple[str, ...] | list[str] = GUEST_MODULES,
                    files: Mapping[str, FileSource] | None = None,
                    kind: str = "guest") -> Path:
    """A gzip'd newc initramfs: static busybox, `init_script` as /init, the modules (with their
    dependencies, insmod order in /etc/kvmpy-modules) and extra `files` (path -> content)."""
    busybox = find_busybox()
    extra = {path: _content(src) for path, src in (files or {}).items()}
    # Fast path: the unpacked kernel tree is immutable (named after its .deb) and busybox is
    # keyed by its stat, so a hit costs no module reads (slow over 9p inside L1).
    quick = _quick_key(kernel, busybox, init_script, modules, extra)
    ref = images_dir() / f"{kind}-{quick}.ref"
    try:
        target = images_dir() / ref.read_text().strip()
        if target.parent == images_dir() and target.is_file():
            return target
    except OSError:
        pass
    module_paths = resolve_modules(kernel, list(modules))
    busybox_bytes = busybox.read_bytes()
    h = hashlib.sha256()
    h.update(f"{BUILDER_VERSION}\0{kernel.release}\0{init_script}\0".encode())
    h.update(hashlib.sha256(busybox_bytes).digest())
    module_blobs = []
    for ko in module_paths:
        blob = ko.read_bytes()
        module_blobs.append((ko.name, blob))
        h.update(ko.name.encode() + b"\0" + hashlib.sha256(blob).digest())
    for path in sorted(extra):
        h.update(path.encode() + b"\0" + hashlib.sha256(extra[path]).digest())
    digest = h.hexdigest()
    cached = images_dir() / f"{kind}-{digest[:16]}.cpio.gz"
    if cached.exists():
        _store(kind, quick, ".ref", cached.name.encode())
        return cached

    archive = CpioArchive()
    for d in ("dev", "proc", "sys", "tmp", "mnt", "root", "etc", "lib/modules"):
        archive.add_dir(d)
    archive.add_char_device("dev/console", 5, 1)
    archive.add_char_device("dev/null", 1, 3, 0o666)
    archive.add_file("bin/busybox", busybox_bytes, 0o755)
    archive.add_symlink("bin/sh", "busybox")
    archive.add_file("init", init_script.encode(), 0o755)
    archive.add_file("etc/kvmpy-modules", "".join(n + "\n" for n, _ in module_blobs).encode())
    for name, blob in module_blobs:
        archive.add_file(f"lib/modules/{name}", blob)
    for path, data in extra.items():
        archive.add_file(path, data, 0o755 if path.endswith(".sh") else 0o644)
    payload = gzip.compress(archive.to_bytes(), compresslevel=6, mtime=0)
    out = _store(kind, digest, ".cpio.gz", payload)
    _store(kind, quick, ".ref", out.name.encode())
    log.info("built %s (%d KiB, %d modules)", out, len(payload) // 1024, len(module_blobs))
    return out


def build_guest_initramfs(kernel: KernelPackage, script: str | None = None,
                          modules: tuple[str, ...] | list[str] = GUEST_MODULES,
                          files: Mapping[str, FileSource] | None = None) -> Path:
    """Tier-2 guest initramfs; `script` is baked in as /test.sh (else pass kvmpy.test=)."""
    extra = dict(files or {})
    if script is not None:
        extra["test.sh"] = script
    return build_initramfs(kernel, initscripts.GUEST_INIT, modules, extra, kind="guest")


def build_l1_initramfs(kernel: KernelPackage) -> Path:
    """L1's initramfs: 9p/overlay to reach the host root, kvm/vhost to be a KVM host."""
    return build_initramfs(kernel, initscripts.L1_INIT, L1_MODULES, kind="l1")


def build_ext4(files: Mapping[str, FileSource], size_mib: int = 16, label: str = "kvmpy") -> Path:
    """An ext4 image holding `files` (path -> content), made without root via mkfs.ext4 -d."""
    if not 1 <= size_mib <= 4096:
        raise NestedError("building an ext4 image", detail=f"size {size_mib} MiB out of range")
    if not label.isalnum() or len(label) > 16:
        raise NestedError("building an ext4 image", detail=f"bad label {label!r}")
    blobs = {path.strip("/"): _content(src) for path, src in files.items()}
    h = hashlib.sha256(f"{BUILDER_VERSION}\0{size_mib}\0{label}\0".encode())
    for path in sorted(blobs):
        if not path or ".." in path.split("/"):
            raise NestedError("building an ext4 image", detail=f"bad member path {path!r}")
        h.update(path.encode() + b"\0" + hashlib.sha256(blobs[path]).digest())
    out = images_dir() / f"disk-{h.hexdigest()[:16]}.ext4"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix="ext4-stage.") as stage:
        for path, data in blobs.items():
            target = Path(stage, "root", path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            target.chmod(0o755 if path.endswith(".sh") else 0o644)
        Path(stage, "root").mkdir(exist_ok=True)
        tmp_image = Path(stage, "image.ext4")
        mkfs = shutil.which("mkfs.ext4") or "/sbin/mkfs.ext4"
        argv = [mkfs, "-q", "-F", "-L", label, "-E", "root_owner=0:0",
                "-d", str(Path(stage, "root")), str(tmp_image), f"{size_mib}M"]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NestedError("building an ext4 image", detail=str(e)) from e
        if proc.returncode != 0:
            raise NestedError("building an ext4 image",
                              detail=f"mkfs.ext4 exited {proc.returncode}: {proc.stderr.strip()}")
        os.replace(tmp_image, out)
    return out
