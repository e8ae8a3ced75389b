"""Loader for the tiny real-mode guests in tests/guest/, kept in the package because
`kvmpy bench exits` runs one (pio_loop). The tests' richer variant (several vCPUs, an irqchip, a
dirty ring) lives in tests/support/tinyguest.py and builds on this one.

A tiny guest is a flat 16-bit binary loaded at LOAD_ADDR and entered with CS=0, IP=LOAD_ADDR;
its inputs are general registers set here. Real mode needs no page tables or GDT, so a guest is
a handful of instructions (this host's KVM emulates about a million per second).
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvmpy.errors import BootError, KvmpyError
from kvmpy.ioctl import Kvm, Vcpu, Vm
from kvmpy.memslots import GuestMemory

LOAD_ADDR = 0x1000
STACK_TOP = 0x8000
REPO_ROOT = Path(__file__).resolve().parents[2]
GUEST_DIR = REPO_ROOT / "tests" / "guest"


def guest_binary(name: str, build: bool = True) -> Path:
    """Path of tests/guest/out/<name>.bin, running `make -C tests/guest` if it is missing."""
    path = GUEST_DIR / "out" / f"{name}.bin"
    if not path.exists() and build:
        if not (GUEST_DIR / "Makefile").exists():
            raise BootError(f"building tiny guest {name}", detail=f"{GUEST_DIR} is not in this checkout")
        proc = subprocess.run(["make", "-s", "-C", str(GUEST_DIR)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise BootError(f"building tiny guest {name}", detail=proc.stderr.strip()[-500:])
    if not path.exists():
        raise BootError(f"loading tiny guest {name}", detail=f"{path} not found (run make -C tests/guest)")
    return path


def enter_real_mode(vcpu: Vcpu, ip: int = LOAD_ADDR, sp: int = STACK_TOP, **regs: int) -> None:
    """Point the vCPU at `ip` in real mode with flat zero segments; set extra registers by name
    (rax=..., rcx=...)."""
    sregs = vcpu.get_sregs()
    for seg in (sregs.cs, sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        seg.base = 0
        seg.selector = 0
    vcpu.set_sregs(sregs)
    r = vcpu.get_regs()
    r.rip = ip
    r.rsp = sp
    r.rflags = 0x2
    for name, value in regs.items():
        setattr(r, name, value)
    vcpu.set_regs(r)


@dataclass
class TinyVm:
    """A VM with one RAM slot at GPA 0 and one vCPU, for tiny guests. Close it when done."""
    kvm: Kvm
    vm: Vm
    memory: GuestMemory
    vcpus: list[Vcpu] = field(default_factory=list)

    @classmethod
    def create(cls, mem_bytes: int = 1 << 20, device: str = "/dev/kvm", vcpus: int = 1,
               slot_flags: int = 0, prepare_vm: Callable[[Vm], None] | None = None) -> "TinyVm":
        """One RAM slot of `mem_bytes` at GPA 0 and `vcpus` vCPUs; `prepare_vm` runs on the new
        VM before memory and vCPUs exist (where KVM wants an irqchip or a dirty ring set up)."""
        kvm = Kvm(device)
        vm = memory = None
        try:
            vm = kvm.create_vm()
            if prepare_vm is not None:
                prepare_vm(vm)
            memory = GuestMemory.create(mem_bytes)
            vm.set_user_memory_region(0, 0, memory.size, memory.host_address(0), slot_flags)
            tiny = cls(kvm, vm, memory)
            tiny.vcpus = [vm.create_vcpu(i) for i in range(vcpus)]
            return tiny
        except BaseException:
            for obj in (memory, vm, kvm):
                if obj is not None:
                    obj.close()
            raise

    @property
    def vcpu(self) -> Vcpu:
        return self.vcpus[0]

    def load(self, name: str, vcpu_index: int = 0, **regs: int) -> None:
        """Copy tests/guest/out/<name>.bin to LOAD_ADDR and enter it with `regs`."""
        code = guest_binary(name).read_bytes()
        self.memory.write(LOAD_ADDR, code)
        enter_real_mode(self.vcpus[vcpu_index], **regs)

    def close(self) -> None:
        errors: list[KvmpyError | OSError] = []
        for obj in (self.vm, self.memory, self.kvm):
            try:
                obj.close()
            except (KvmpyError, OSError) as e:
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> "TinyVm":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

