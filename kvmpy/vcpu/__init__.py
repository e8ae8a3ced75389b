"""kvmpy.vcpu"""
