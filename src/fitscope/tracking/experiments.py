"""MLflow experiments: found or created once, even by concurrent jobs, with their
description and kind.
"""

from __future__ import annotations

from fitscope.tracking.store import sqlite_path, store_lock
from fitscope.tracking.tags import KIND_TAG, KIND_TRAINING, NOTE_TAG


def ensure_experiment(client, name: str, description: str | None = None) -> str:
    """Id of experiment ``name``, created (artifacts under ./mlartifacts) if missing.

    The experiment is marked as model training (the UI then opens on its runs) and gets
    ``description`` when it has none yet (a user's own edit in the UI is kept).
    """
    with store_lock(client.tracking_uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            db = sqlite_path(client.tracking_uri)
            location = str(db.parent / "mlartifacts" / name) if db is not None else None
            from mlflow.exceptions import MlflowException

            try:
                exp_id = client.create_experiment(name, artifact_location=location)
                tags: dict[str, str] = {}
            except MlflowException:
                # A server has no lock to hold: another job created it first (name taken).
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp is not None:
            exp_id, tags = exp.experiment_id, exp.tags
        if tags.get(KIND_TAG) != KIND_TRAINING:
            _set_experiment_tag(client, exp_id, KIND_TAG, KIND_TRAINING)
        if description and not tags.get(NOTE_TAG):
            _set_experiment_tag(client, exp_id, NOTE_TAG, description)
        return exp_id


def _set_experiment_tag(client, exp_id: str, key: str, value: str) -> None:
    """Set an experiment tag that concurrent jobs may be setting at the same moment.

    On a server the store inserts a new tag row: of two jobs inserting it at once, the
    loser's insert is refused (HTTP 400, seen with 8 jobs on a SQLite-backed server).
    The tag exists then, set by the winner, which is all this needs.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.set_experiment_tag(exp_id, key, value)
    except MlflowException:
        if key not in client.get_experiment(exp_id).tags:
            raise
