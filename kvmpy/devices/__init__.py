"""kvmpy.devices"""
