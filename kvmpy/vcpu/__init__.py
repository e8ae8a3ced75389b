"""vCPU threads, exit dispatch and vCPU state capture/restore (above kvmpy.ioctl)."""
