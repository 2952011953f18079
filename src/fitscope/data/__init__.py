"""Downloading, verifying and splitting HIGGS and MNIST, and the verified loader of the splits.

Imports only fitscope.core.
"""
