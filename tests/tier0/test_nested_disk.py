"""Tier 0: the harness's optional L1 disk (--disk): QEMU options, the exported device name,
and refusal of paths that could not be passed safely in a -drive option."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmpy.errors import NestedError
from kvmpy.nested import cli
from kvmpy.nested.harness import L1_DISK_DEVICE, HarnessConfig, L1Harness


def harness_with(config: HarnessConfig) -> L1Harness:
    """An L1Harness without kernel/initramfs setup: enough for argv and scratch files."""
    h = object.__new__(L1Harness)
    config.validate()
    h.config = config
    h.kernel = SimpleNamespace(vmlinux=Path("/k/vmlinux"))
    h.initrd = Path("/k/initrd")
    return h


def test_disk_is_attached_as_a_snapshot_virtio_disk_and_exported(tmp_path):
    image = tmp_path / "bench.raw"
    image.write_bytes(b"\x01" * 4096)
    h = harness_with(HarnessConfig(disk=image))
    argv = h._qemu_argv(tmp_path, "run", interactive=False)
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith(f"file={image},format=raw") and drive.endswith(",snapshot=on")
    assert any(a.startswith("virtio-blk-pci,drive=l1disk") for a in argv)
    h._write_scratch(tmp_path, "true", tmp_path, {})
    assert f"export KVMPY_NESTED_DISK={L1_DISK_DEVICE}" in (tmp_path / "env.sh").read_text()


def test_no_disk_means_no_drive_and_no_export(tmp_path):
    h = harness_with(HarnessConfig())
    assert "-drive" not in h._qemu_argv(tmp_path, "run", interactive=False)
    h._write_scratch(tmp_path, "true", tmp_path, {})
    assert "KVMPY_NESTED_DISK" not in (tmp_path / "env.sh").read_text()


def test_disk_must_be_an_existing_file_with_a_plain_path(tmp_path):
    with pytest.raises(NestedError):
        HarnessConfig(disk=tmp_path / "missing.raw").validate()
    odd = tmp_path / "a,b.raw"
    odd.write_bytes(b"\x00" * 512)
    with pytest.raises(NestedError):
        HarnessConfig(disk=odd).validate()
    with pytest.raises(NestedError):
        HarnessConfig(disk=tmp_path).validate()


def test_cli_accepts_disk_for_run_and_shell():
    args = cli._parser().parse_args(["run", "--disk", "x.raw", "--", "true"])
    assert args.disk == Path("x.raw")
    assert cli._parser().parse_args(["shell"]).disk is None
