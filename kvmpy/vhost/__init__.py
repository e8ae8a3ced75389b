"""kvmpy.vhost"""
