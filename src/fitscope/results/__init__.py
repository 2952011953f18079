"""The metrics.json contract, the seed averages, the verdict rule and the figures.

Imports only fitscope.core.
"""
