"""kvmpy.migrate: save/restore and live pre-copy migration. Empty until that issue lands; the
pieces it will use exist: VcpuState (kvmpy.vcpu.state), each device's state()/restore(), and
dirty logging/rings in kvmpy.ioctl + kvmpy.memslots.dirty."""
