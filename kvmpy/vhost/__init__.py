"""kvmpy.vhost: vhost-net offload (TAP via pyroute2). Empty until that issue lands; nothing
imports it yet. The ioctl layer already binds <linux/vhost.h> (kvmpy.ioctl.request_numbers)."""
