"""CFFI over <linux/kvm.h> and <linux/vhost.h>: Kvm, Vm and Vcpu objects, no policy.

The compiled module kvmpy.ioctl._kvm is built by kvmpy/ioctl/_build.py (pip install -e ., or
`python kvmpy/ioctl/_build.py` in place).
"""
from kvmpy.ioctl._kvm import ffi, lib
from kvmpy.ioctl.system import Kvm
from kvmpy.ioctl.vcpu import FailEntry, InternalError, IoExit, MmioExit, RunLayout, SystemEvent, Vcpu
from kvmpy.ioctl.vm import Vm

__all__ = ["ffi", "lib", "Kvm", "Vm", "Vcpu", "RunLayout", "IoExit", "MmioExit", "SystemEvent",
           "InternalError", "FailEntry"]
