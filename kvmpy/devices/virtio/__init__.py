"""kvmpy.devices.virtio"""
