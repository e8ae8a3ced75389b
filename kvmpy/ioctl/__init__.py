"""kvmpy.ioctl"""
