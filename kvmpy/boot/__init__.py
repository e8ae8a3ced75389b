"""kvmpy.boot"""
