"""Tier 0: the nested harness's image plumbing (cpio writer, bzImage payload extraction,
module dependency resolution, initramfs/ext4 builders) on synthetic inputs, no /dev/kvm."""
from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from kvmpy.errors import NestedError
from kvmpy.nested import images, kernel
from kvmpy.nested.cpio import CpioArchive


def parse_newc(blob: bytes) -> dict[str, tuple[int, bytes, int, int]]:
    """path -> (mode, data, rdev major, rdev minor); checks magic, padding and the trailer."""
    out, pos = {}, 0
    while True:
        assert blob[pos:pos + 6] == b"070701"
        f = [int(blob[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        name = blob[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        data = blob[pos:pos + filesize]
        pos += filesize + (-filesize % 4)
        if name == "TRAILER!!!":
            assert pos == len(blob)
            return out
        out[name] = (f[1], data, f[9], f[10])


def test_cpio_members_parents_devices_and_padding():
    a = CpioArchive()
    a.add_file("lib/modules/x.ko", b"abc", 0o644)
    a.add_symlink("bin/sh", "busybox")
    a.add_char_device("dev/console", 5, 1)
    entries = parse_newc(a.to_bytes())
    assert stat.S_ISDIR(entries["lib"][0]) and stat.S_ISDIR(entries["lib/modules"][0])
    assert entries["lib/modules/x.ko"][1] == b"abc"
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    mode, _, major, minor = entries["dev/console"]
    assert stat.S_ISCHR(mode) and (major, minor) == (5, 1)
    assert a.to_bytes() == a.to_bytes()  # reproducible


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_cpio_is_readable_by_gnu_cpio():
    a = CpioArchive()
    a.add_file("etc/hello", b"hi\n")
    proc = subprocess.run(["cpio", "-it"], input=a.to_bytes(), capture_output=True, check=True)
    assert proc.stdout.decode().split() == ["etc", "etc/hello"]


@pytest.mark.parametrize("bad", ["", "/", "a/../b", "../x"])
def test_cpio_rejects_escaping_paths(bad):
    with pytest.raises(NestedError):
        CpioArchive().add_file(bad, b"")


def fake_bzimage(payload: bytes, version: int = 0x20F) -> bytes:
    setup_sects = 4
    img = bytearray((setup_sects + 1) * 512)
    img[0x1F1] = setup_sects
    img[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", img, 0x206, version)
    struct.pack_into("<II", img, 0x248, 16, len(payload))
    return bytes(img) + b"\0" * 16 + payload + b"\x00\x11\x22\x33"


def test_extract_vmlinux_from_xz_and_gzip_payloads():
    elf = b"\x7fELF" + bytes(range(256)) * 8
    assert kernel.extract_vmlinux(fake_bzimage(lzma.compress(elf, format=lzma.FORMAT_XZ))) == elf
    assert kernel.extract_vmlinux(fake_bzimage(gzip.compress(elf))) == elf


@pytest.mark.parametrize("image", [
    b"\0" * 0x300,                                                  # no HdrS
    fake_bzimage(lzma.compress(b"\x7fELF", format=lzma.FORMAT_XZ), version=0x206),
    fake_bzimage(b"\x28\xb5\x2f\xfd" + b"zstd"),                    # unsupported codec
    fake_bzimage(gzip.compress(b"not an elf")),
    fake_bzimage(b"")[:-10],                                        # truncated payload
])
def test_extract_vmlinux_rejects_bad_images(image):
    with pytest.raises(NestedError):
        kernel.extract_vmlinux(image)


def fake_module(depends: str | None) -> bytes:
    """A minimal ELF64 with a .modinfo section (and a section name table)."""
    modinfo = b"license=GPL\0" + (f"depends={depends}\0".encode() if depends is not None else b"")
    shstr = b"\0.modinfo\0.shstrtab\0"
    data_off = 64
    shoff = data_off + len(modinfo) + len(shstr)
    shoff += -shoff % 8
    hdr = bytearray(64)
    hdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", hdr, 0x28, shoff)
    struct.pack_into("<HHH", hdr, 0x3A, 64, 3, 2)
    body = modinfo + shstr
    body += b"\0" * (shoff - data_off - len(body))
    sections = bytes(64)
    sections += struct.pack("<IIQQQQ", 1, 1, 0, 0, data_off, len(modinfo)) + bytes(24)
    sections += struct.pack("<IIQQQQ", 10, 3, 0, 0, data_off + len(modinfo), len(shstr)) + bytes(24)
    return bytes(hdr) + body + sections


def test_modinfo_depends_reads_the_section():
    assert kernel.modinfo_depends(fake_module("a,b-c")) == ["a", "b-c"]
    assert kernel.modinfo_depends(fake_module("")) == []
    assert kernel.modinfo_depends(fake_module(None)) == []
    with pytest.raises(NestedError):
        kernel.modinfo_depends(b"\x7fELF\x01" + bytes(64))


def fake_kernel(tmp_path: Path, modules: dict[str, str | None], builtin=()) -> kernel.KernelPackage:
    release = "6.1.0-99-amd64"
    mdir = tmp_path / "pkg" / "lib" / "modules" / release
    (mdir / "kernel" / "drivers").mkdir(parents=True)
    order = []
    for name, deps in modules.items():
        (mdir / "kernel" / "drivers" / f"{name}.ko").write_bytes(fake_module(deps))
        order.append(f"kernel/drivers/{name}.ko")
    (mdir / "modules.order").write_text("\n".join(order) + "\n")
    (mdir / "modules.builtin").write_text("".join(f"kernel/x/{b}.ko\n" for b in builtin))
    boot = tmp_path / "pkg" / "boot"
    boot.mkdir()
    return kernel.KernelPackage(release, tmp_path / "pkg", boot / "bz", boot / "vmlinux",
                                boot / "config")


def test_resolve_modules_orders_dependencies_first_and_skips_builtins(tmp_path):
    pkg = fake_kernel(tmp_path, {"top": "mid,core", "mid": "core,builtin_one", "core": "",
                                 "virtio-rng": "core"}, builtin=["builtin_one"])
    names = [p.stem for p in kernel.resolve_modules(pkg, ["top", "virtio_rng"])]
    assert names == ["core", "mid", "top", "virtio-rng"]


def test_resolve_modules_reports_missing_and_cycles(tmp_path):
    pkg = fake_kernel(tmp_path, {"a": "b", "b": "a", "c": "nope"})
    with pytest.raises(NestedError, match="cycle"):
        kernel.resolve_modules(pkg, ["a"])
    with pytest.raises(NestedError, match="nope"):
        kernel.resolve_modules(pkg, ["c"])


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVMPY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_initramfs_contents_and_input_hashing(tmp_path, isolated_cache):
    try:
        images.find_busybox()
    except NestedError as e:
        pytest.skip(str(e))
    pkg = fake_kernel(tmp_path, {"leaf": "", "virtio_pci": "leaf"})
    first = images.build_guest_initramfs(pkg, script="echo one\n", modules=["virtio_pci"])
    again = images.build_guest_initramfs(pkg, script="echo one\n", modules=["virtio_pci"])
    other = images.build_guest_initramfs(pkg, script="echo two\n", modules=["virtio_pci"])
    assert first == again and first != other
    assert first.parent == isolated_cache / "nested" / "images"
    entries = parse_newc(gzip.decompress(first.read_bytes()))
    assert entries["etc/kvmpy-modules"][1] == b"leaf.ko\nvirtio_pci.ko\n"
    assert entries["test.sh"][1] == b"echo one\n"
    assert b"KVMPY-TEST-RC=" in entries["init"][1] and entries["init"][0] & 0o111
    assert stat.S_ISCHR(entries["dev/console"][0])
    # A changed module (new kernel tree content) is noticed once the quick reference is gone.
    for ref in first.parent.glob("*.ref"):
        ref.unlink()
    (pkg.modules_dir / "kernel/drivers/leaf.ko").write_bytes(fake_module("") + b"\0")
    assert images.build_guest_initramfs(pkg, script="echo one\n", modules=["virtio_pci"]) != first


@pytest.mark.skipif(shutil.which("debugfs") is None and not Path("/sbin/debugfs").exists(),
                    reason="debugfs (e2fsprogs) not installed")
def test_ext4_image_holds_the_files(isolated_cache):
    image = images.build_ext4({"test.sh": "echo hi\n", "sub/data.txt": b"42\n"}, size_mib=4,
                              label="t0")
    assert image == images.build_ext4({"sub/data.txt": b"42\n", "test.sh": "echo hi\n"},
                                      size_mib=4, label="t0")
    debugfs = shutil.which("debugfs") or "/sbin/debugfs"
    out = subprocess.run([debugfs, "-R", "cat /sub/data.txt", str(image)],
                         capture_output=True, check=True).stdout
    assert out == b"42\n"
    for bad in ({"../x": b""}, {"": b""}):
        with pytest.raises(NestedError):
            images.build_ext4(bad)
    with pytest.raises(NestedError):
        images.build_ext4({"a": b""}, label="bad label")
