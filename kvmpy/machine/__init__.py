"""The only composer: a machine's configuration, its device table, the wiring of devices to
KVM (interrupt lines, MSI routes, ioeventfds) and its lifecycle (run states)."""
from kvmpy.machine.config import MachineConfig
from kvmpy.machine.lifecycle import Machine, MachineExit

__all__ = ["Machine", "MachineConfig", "MachineExit"]
