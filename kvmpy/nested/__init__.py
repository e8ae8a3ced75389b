"""kvmpy.nested"""
