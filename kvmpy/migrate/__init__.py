"""kvmpy.migrate"""
