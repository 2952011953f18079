"""The Hydra entry, one training job, its claim and outputs, the sweep callback, the DVC
stages and sweeps, and the config schema.

May import every layer below it.
"""
