"""kvmpy.vhost: virtio-net's host side: the TAP (tap.py, pyroute2), the vhost-net offload (net.py)
and make_nic (nic.py), which the machine's VIRTIO_BACKENDS row calls for each --nic."""
