"""The tier-1 gate (kvm_host.py) decides from the OS alone, in words the skip allow-list accepts."""
from __future__ import annotations

import os

from kvm_host import KVM_PATH, host_kvm_unusable_reason
from skipcheck import unexpected_skips


def test_missing_node_and_plain_file_are_environmental(tmp_path):
    plain = tmp_path / "kvm"
    plain.write_bytes(b"")
    reasons = [host_kvm_unusable_reason(str(tmp_path / "absent")), host_kvm_unusable_reason(str(plain))]
    assert all(r and r.startswith("no /dev/kvm on this host") for r in reasons), reasons
    assert unexpected_skips([("t", r) for r in reasons]) == []


def test_an_openable_kvm_node_means_tier1_runs():
    """Where this process can open /dev/kvm itself, the gate must say so (and tier 1 then treats
    any failure of kvmpy's Kvm() as a failure)."""
    try:
        os.close(os.open(KVM_PATH, os.O_RDWR))
    except OSError:
        assert host_kvm_unusable_reason() is not None
    else:
        assert host_kvm_unusable_reason() is None
