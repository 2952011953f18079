"""Sweep jobs on a cluster (Ray, SLURM): what a job needs from the process that started it.

A Ray worker does not inherit the driver's environment or working directory (it starts
in the Ray head's), so the Ray preset (``conf/hydra/launcher/ray.yaml``) hands the jobs
:func:`job_env` through Ray's ``runtime_env`` and runs :func:`setup_worker` in each worker.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from omegaconf import DictConfig, OmegaConf

from fitscope.core.errors import FitscopeError
from fitscope.tracking.store import resolve_tracking_uri

JOB_CWD_ENV = "FITSCOPE_JOB_CWD"  # the driver's directory: relative paths mean the same there

# What a job reads from its environment: the tracking server and its credentials, the
# sweep's parent run and job count, the entry process (interrupts, orphan watchdog), the
# S3 endpoint of the artifact store and where the fitscope package is imported from.
FORWARDED = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "FITSCOPE_PARENT_RUN_ID",
    "FITSCOPE_PARENT_SPEC",
    "FITSCOPE_SWEEP_JOBS",
    "FITSCOPE_OPTUNA_STORAGE",  # a search trial reaches its study (its URL is not in the job)
    "FITSCOPE_ENTRY_OWNER",
    "DVC_ROOT",
    "DVC_STAGE",
    "PYTHONPATH",
)


def job_env() -> dict[str, str]:
    """The driver's variables a job needs (``${fitscope.job_env:}``), read when the sweep
    launches, i.e. after the sweep callback has created the parent run."""

    env = {key: os.environ[key] for key in FORWARDED if os.environ.get(key)}
    # Unset, the default store is a file in the driver's directory, not the worker's.
    env["MLFLOW_TRACKING_URI"] = resolve_tracking_uri()
    env[JOB_CWD_ENV] = os.getcwd()
    return env


def setup_worker() -> None:
    """Ray ``worker_process_setup_hook``: work in the driver's directory, as a local job
    does (sweep outputs, data and checkpoint paths are relative to it)."""
    cwd = os.environ.get(JOB_CWD_ENV)
    if cwd:
        os.chdir(cwd)


def prepare_driver(launcher: DictConfig) -> None:
    """Ready this process to drive ``launcher`` (called when a sweep starts, before any
    run exists): a Ray head that does not answer is a one-line error, not a hang.

    A Ray head bound to loopback (a one-machine stack) needs a loopback driver: left to
    itself Ray resolves 127.0.0.1 to the machine's network address and waits for the head
    there forever. Ray reads the switch when it is imported, i.e. when the sweep launches.
    """
    if "hydra_ray_launcher" not in str(launcher.get("_target_", "")):
        return
    address = str(OmegaConf.select(launcher, "ray.init.address") or "")
    if address in ("", "auto", "local"):
        return  # a Ray started for this sweep (or found by Ray itself)
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except (OSError, ValueError):
        raise FitscopeError(
            f"no Ray head answers at {address}. Fix: start it (`make stack`, then "
            "`source stack.env`) or correct FITSCOPE_RAY_ADDRESS / "
            "hydra.launcher.ray.init.address"
        ) from None
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name
        loopback = False
    if loopback:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
