"""kvmpy.monitor: the QMP-compatible control socket. Empty until that issue lands."""
