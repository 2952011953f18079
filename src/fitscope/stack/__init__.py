"""The local team stack (PostgreSQL, S3, MLflow server, Ray head): started and stopped by PID.

Imports only fitscope.core.
"""
