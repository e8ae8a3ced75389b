"""kvmpy: a KVM userspace VMM in Python.

Nothing here registers itself at import time; `kvmpy.machine` is the only composer.
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    """`kvmpy.Machine` and `kvmpy.MachineConfig`, imported on first use: `python -m kvmpy`
    starts by importing this package, and every module costs start-up time under nesting."""
    if name in ("Machine", "MachineConfig", "MachineExit"):
        import kvmpy.machine
        return getattr(kvmpy.machine, name)
    raise AttributeError(f"module 'kvmpy' has no attribute {name!r}")
