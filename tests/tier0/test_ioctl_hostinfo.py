"""host_kvm_kind and `kvmpy info` without access to KVM."""
from __future__ import annotations

import argparse

from kvmpy.cli import info as hostinfo


def test_kind_is_none_without_a_device(tmp_path):
    assert hostinfo.host_kvm_kind(str(tmp_path / "kvm"), str(tmp_path)) == "none"


def test_kind_is_pvm_with_the_module_and_no_vmx(tmp_path, monkeypatch):
    (tmp_path / "kvm_pvm").mkdir()
    dev = tmp_path / "kvm"
    dev.write_bytes(b"")
    monkeypatch.setattr(hostinfo, "cpu_virt_flags", lambda cpuinfo="": set())
    assert hostinfo.host_kvm_kind(str(dev), str(tmp_path)) == "pvm"
    monkeypatch.setattr(hostinfo, "cpu_virt_flags", lambda cpuinfo="": {"vmx"})
    (tmp_path / "kvm_pvm").rmdir()
    assert hostinfo.host_kvm_kind(str(dev), str(tmp_path)) == "hardware"


def test_pvm_meaning_points_at_the_nested_harness():
    text = " ".join(hostinfo.meaning("pvm", vhost=False))
    assert "cannot boot" in text and "make test-tier2" in text and "vhost-net" in text


def test_info_without_kvm_is_one_line_and_exit_1(tmp_path, capsys):
    rc = hostinfo.main(argparse.Namespace(json=False, device=str(tmp_path / "kvm")))
    err = capsys.readouterr().err
    assert rc == 1
    assert err.count("\n") == 1 and "kvm" in err
