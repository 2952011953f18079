"""Everything that talks to MLflow: the store, tags, experiments, liveness, parent runs, claims,
the run, offline records and sync, the registry.

Imports only fitscope.core.
"""
