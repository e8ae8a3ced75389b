"""kvmpy: a KVM userspace VMM in Python.

Nothing here registers itself at import time; `kvmpy.machine` is the only composer.
"""
__version__ = "0.1.0"
