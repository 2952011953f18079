"""The MLP and its metrics (torch and torchmetrics).

Imports only fitscope.core.
"""
