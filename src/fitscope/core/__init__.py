"""Errors and the one-line error printer, value checks, crash-safe file I/O, progress lines,
process identity.

Imports nothing of fitscope.
"""
