"""Every ioctl number, sizeof and offsetof kvmpy uses must equal what the C compiler computes
from <linux/kvm.h> and <linux/vhost.h> (no /dev/kvm needed)."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from kvmpy.ioctl import request_numbers as numbers
from kvmpy.ioctl._kvm import ffi, lib
from kvmpy.ioctl.vcpu import RunLayout

STRUCTS = sorted({t for (_, _, _, t) in numbers.TABLE.values() if t and t.startswith("struct")} | {
    "struct kvm_run", "struct kvm_dirty_gfn", "struct kvm_irq_routing_entry", "struct kvm_msr_entry",
    "struct kvm_cpuid_entry2", "struct kvm_segment", "struct kvm_dtable", "struct kvm_xcr",
    "struct kvm_pic_state", "struct kvm_ioapic_state", "struct vhost_memory_region",
    "struct kvm_coalesced_mmio", "struct kvm_coalesced_mmio_ring"})
OFFSETS = [("struct kvm_run", f) for f in ("immediate_exit", "exit_reason", "io", "mmio", "system_event",
                                           "internal", "fail_entry", "kvm_valid_regs", "s")] + [
    ("struct kvm_sregs", f) for f in ("cs", "tr", "gdt", "idt", "cr0", "efer", "apic_base", "interrupt_bitmap")] + [
    ("struct kvm_regs", f) for f in ("rax", "rsp", "rip", "rflags")] + [
    ("struct kvm_ioeventfd", f) for f in ("datamatch", "addr", "len", "fd", "flags")] + [
    ("struct kvm_irq_routing_entry", "u"), ("struct kvm_irqchip", "chip"), ("struct kvm_msrs", "entries"),
    ("struct kvm_cpuid2", "entries"), ("struct kvm_clear_dirty_log", "dirty_bitmap"),
    ("struct kvm_dirty_log", "dirty_bitmap"), ("struct kvm_vcpu_events", "exception_payload"),
    ("struct kvm_fpu", "mxcsr"), ("struct kvm_xcrs", "xcrs"), ("struct kvm_dirty_gfn", "offset"),
    ("struct kvm_translation", "physical_address"), ("struct kvm_translation", "valid")]
NESTED = [("struct kvm_run", "io", "data_offset"), ("struct kvm_run", "io", "port"),
          ("struct kvm_run", "mmio", "data"), ("struct kvm_run", "mmio", "len"),
          ("struct kvm_run", "mmio", "is_write"), ("struct kvm_run", "system_event", "data")]


@pytest.fixture(scope="module")
def c_values(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    lines = []
    for name in numbers.TABLE:
        lines.append(f'printf("\\"ioctl:{name}\\": %lu,\\n", (unsigned long)({name}));')
    for s in STRUCTS:
        lines.append(f'printf("\\"sizeof:{s}\\": %zu,\\n", sizeof({s}));')
    for s, f in OFFSETS:
        lines.append(f'printf("\\"offsetof:{s}.{f}\\": %zu,\\n", offsetof({s}, {f}));')
    for s, a, b in NESTED:
        lines.append(f'printf("\\"offsetof:{s}.{a}.{b}\\": %zu,\\n", offsetof({s}, {a}.{b}));')
    src = ("#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\n#include <linux/vhost.h>\n"
           "int main(void) { printf(\"{\\n\");\n" + "\n".join(lines) + "\nprintf(\"\\\"end\\\": 0}\\n\"); return 0; }\n")
    d = tmp_path_factory.mktemp("abi")
    (d / "abi.c").write_text(src)
    subprocess.run(["gcc", "-o", str(d / "abi"), str(d / "abi.c")], check=True)
    return json.loads(subprocess.run([str(d / "abi")], check=True, capture_output=True, text=True).stdout)


def test_every_ioctl_number_matches_the_headers(c_values):
    wrong = {n: (hex(v), hex(c_values[f"ioctl:{n}"])) for n, v in numbers.NUMBERS.items()
             if v != c_values[f"ioctl:{n}"]}
    assert not wrong
    assert len(numbers.NUMBERS) >= 60


def test_every_struct_size_matches(c_values):
    wrong = {s: (ffi.sizeof(s), c_values[f"sizeof:{s}"]) for s in STRUCTS if ffi.sizeof(s) != c_values[f"sizeof:{s}"]}
    assert not wrong


def test_every_offset_matches(c_values):
    for s, f in OFFSETS:
        assert ffi.offsetof(s, f) == c_values[f"offsetof:{s}.{f}"], (s, f)
    for s, a, b in NESTED:
        assert ffi.offsetof(s, a, b) == c_values[f"offsetof:{s}.{a}.{b}"], (s, a, b)


def test_run_layout_uses_compiler_offsets(c_values):
    assert RunLayout.exit_reason == c_values["offsetof:struct kvm_run.exit_reason"]
    assert RunLayout.io == c_values["offsetof:struct kvm_run.io"]
    assert RunLayout.mmio_data == c_values["offsetof:struct kvm_run.mmio.data"]


def test_known_fixed_points():
    # KVM_RUN and KVM_GET_API_VERSION are ABI that has not changed since 2007.
    assert numbers.KVM_RUN == 0xAE80
    assert numbers.KVM_GET_API_VERSION == 0xAE00
    assert lib.KVM_DIRTY_LOG_PAGE_OFFSET == 64
