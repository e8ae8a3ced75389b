"""kvmpy.monitor"""
