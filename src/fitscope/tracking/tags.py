"""fitscope's tag vocabulary on MLflow runs, the config hash, git provenance, and exact tag
filters.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError

# A sweep's parent run of each study its jobs train (JSON: study -> run id). A DVC train
# stage's jobs span several studies, each its own MLflow experiment with its own parent.
PARENT_ENV = "FITSCOPE_PARENT_RUN_ID"
# A sweep started while its tracking server was unreachable hands its jobs each parent's
# key, name and tags instead (JSON: study -> spec): a job finds or creates its parent
# itself, or keeps the spec in its pending record for `fitscope runs sync`.
PARENT_SPEC_ENV = "FITSCOPE_PARENT_SPEC"


def sweep_parents(env: str = PARENT_ENV) -> dict[str, Any]:
    """What a sweep handed its jobs in ``env`` (``PARENT_ENV`` or ``PARENT_SPEC_ENV``), by study."""
    value = os.environ.get(env)
    return json.loads(value) if value else {}


TAG = "fitscope."  # prefix of our own tags
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
CONFIG_HASH_TAG = f"{TAG}config_hash"
OWNER_HOST_TAG = f"{TAG}owner.host"
OWNER_PID_TAG = f"{TAG}owner.pid"
OWNER_STARTED_TAG = f"{TAG}owner.started"
HEARTBEAT_TAG = f"{TAG}heartbeat"  # unix seconds of the owner's last sign of life
FAILURE_TAG = f"{TAG}failure"  # why a run is FAILED or KILLED
PRUNED_TAG = f"{TAG}pruned"  # a search's pruner stopped the trial: at which epoch, and why
RECONCILED_TAG = f"{TAG}reconciled"  # when and by whom a dead owner's run was closed
NOTE_TAG = "mlflow.note.content"  # the description the MLflow UI shows (runs, experiments)
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is
# model training (the kinds are in the UI bundle: genai_development, custom_model_development).
KIND_TAG = "mlflow.experimentKind"
KIND_TRAINING = "custom_model_development"


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b": value}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_hash(config: dict[str, Any]) -> str:
    """A stable short hash of a (resolved) config mapping."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# Files that `dvc exp run` / `dvc repro` write themselves before and while stages run
# (params.yaml from -S, dvc.lock after each stage): inside a DVC stage they do not make
# the code a run was trained with differ from the commit.
DVC_WRITTEN = ("params.yaml", "dvc.lock")


def git_state(cwd: str | Path = ".", ignore: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(commit, dirty) of the repository, or ("unknown", False) outside git.

    Changes to the paths in ``ignore`` (relative to the repository root) do not count.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--no-renames"],
            cwd=cwd,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        return commit, any(line[3:] not in ignore for line in status if line.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def source_tags(entry: str) -> dict[str, str]:
    """MLflow's standard source tags and fitscope's git/DVC provenance for a new run.

    ``entry`` names what started the run (``mlflow.source.name``). Inside a DVC stage the
    files DVC writes itself are left out of the dirtiness check, and the tag says so; the
    DVC experiment name (``dvc exp run``) is recorded when there is one.
    """

    in_dvc = bool(os.environ.get("DVC_STAGE"))
    ignore = DVC_WRITTEN if in_dvc else ()
    commit, dirty = git_state(ignore=ignore)
    tags = {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": entry,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        f"{TAG}git_dirty": str(dirty).lower(),
    }
    if ignore:
        tags[f"{TAG}git_dirty_ignores"] = f"{', '.join(ignore)} (written by DVC itself)"
    if os.environ.get("DVC_EXP_NAME"):
        tags[f"{TAG}dvc_exp"] = os.environ["DVC_EXP_NAME"]
    return tags


def tag_equals(key: str, value: str) -> str:
    """An MLflow filter clause ``tags.`key` = '<value>'`` with ``value`` safely quoted.

    MLflow's filter parser takes a string in single or double quotes and has no escape
    for a quote inside it, so a value is quoted with a kind it does not contain; one
    holding both kinds, a backslash or a backquote cannot be expressed and is refused.
    """
    if "`" in key or any(c in value for c in "\\`") or ("'" in value and '"' in value):
        raise FitscopeError(
            f"cannot search MLflow for the tag value {value!r}. Fix: use a name without "
            "quotes, backslashes or backquotes"
        )
    quote = '"' if "'" in value else "'"
    return f"tags.`{key}` = {quote}{value}{quote}"


def commit_parent_key(key: str, commit: str) -> str:
    """An explicit parent key scoped to a git commit: one parent per key and commit."""
    return f"{key}@{commit[:12]}"


FINISHED_FILTER = " and attributes.status = 'FINISHED'"
OFFLINE_TAG = f"{TAG}offline"  # why a run trained without a claim (docs/reliability.md)
OFFLINE_NOTE = "trained without a claim: the tracking server was unreachable when it started"
SYNC_ID_TAG = f"{TAG}sync_id"  # the pending record a run was uploaded from (stable)
DUPLICATE_TAG = f"{TAG}duplicate_of"  # an offline run of a config that another run finished
