"""Outbound calling campaigns: planning and dialing, the scheduled worker, and their command
line.
"""
