"""MLflow tracking: the one place that resolves the tracking URI and talks to MLflow."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

PARENT_ENV = "FITSCOPE_PARENT_RUN_ID"
TAG = "fitscope."  # prefix of our own tags
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by

log = logging.getLogger(__name__)


def resolve_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<cwd>/mlflow.db`` (as `mlflow ui`)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation and experiment creation across processes (SQLite only).

    Concurrent first opens of a fresh SQLite file race on schema migrations and can
    corrupt it; concurrent ``create_experiment`` calls race on the unique name.
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def get_client(uri: str | None = None):
    """An MlflowClient on an initialised store (created under a lock on first use)."""
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    uri = uri or resolve_tracking_uri()
    with _store_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # forces table creation/migration
    return client


def ensure_experiment(client, name: str) -> str:
    """Id of experiment ``name``, created (artifacts under ./mlartifacts) if missing."""
    with _store_lock(client.tracking_uri):
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        db = _sqlite_path(client.tracking_uri)
        location = str(db.parent / "mlartifacts" / name) if db is not None else None
        return client.create_experiment(name, artifact_location=location)


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


def git_state(cwd: str | Path = ".") -> tuple[str, bool]:
    """(commit, dirty) of the repository, or ("unknown", False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=cwd,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def find_finished_run(client, experiment_id: str, chash: str):
    """The newest FINISHED run of this config in the experiment, or None."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG}config_hash` = '{chash}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def commit_parent_key(key: str, commit: str) -> str:
    """An explicit parent key scoped to a git commit: one parent per key and commit."""
    return f"{key}@{commit[:12]}"


def _summary_metrics(values: dict[str, float]) -> list:
    """Single-value metrics (step 0, timestamped now) for one ``log_batch`` call."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in values.items()]


def find_or_create_parent(
    client, experiment_id: str, key: str, run_name: str, tags: dict[str, str] | None = None
) -> str:
    """The parent run tagged ``fitscope.parent_key=key``; created if absent (under the lock)."""
    with _store_lock(client.tracking_uri):
        runs = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{TAG}parent_key` = '{key}'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            return runs[0].info.run_id
        run = client.create_run(
            experiment_id,
            run_name=run_name,
            tags={f"{TAG}parent_key": key, f"{TAG}role": "parent", **(tags or {})},
        )
        return run.info.run_id


def close_parent(client, parent_id: str, objective: str) -> dict[str, Any] | None:
    """Finish a sweep's parent run with its best child's params and objective.

    Returns the best child's summary, or None when no child finished (the parent
    is then marked FAILED).
    """
    from mlflow.entities import RunTag

    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
        max_results=5000,
    )
    key = f"best/{objective}"
    done = [r for r in children if r.info.status == "FINISHED" and key in r.data.metrics]
    counts = {
        "children": len(children),
        "children_finished": len(done),
        "children_failed": sum(r.info.status == "FAILED" for r in children),
    }
    if not done:
        client.log_batch(parent_id, metrics=_summary_metrics(counts))
        client.set_terminated(parent_id, status="FAILED")
        return None
    sign = 1 if objective.endswith("loss") else -1
    best = min(done, key=lambda r: sign * r.data.metrics[key])
    metrics = _summary_metrics({**counts, key: best.data.metrics[key]})
    tags = [
        RunTag(f"{TAG}best_run_id", best.info.run_id),
        RunTag(f"{TAG}best_variant", best.data.tags.get(f"{TAG}variant", "")),
        *(
            RunTag(f"best_param.{k}"[:250], v[:8000])
            for k, v in best.data.params.items()
            if k.startswith(("optimizer.", "regularization.", "model."))
        ),
    ]
    client.log_batch(parent_id, metrics=metrics, tags=tags)
    client.set_terminated(parent_id, status="FINISHED")
    return {"run_id": best.info.run_id, "value": best.data.metrics[key], **counts}


class RunTracker:
    """One MLflow run: params, tags, batched per-epoch metrics, model, final status."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.run_id = client, run_id

    @classmethod
    def create(
        cls, client, experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> RunTracker:
        from mlflow.entities import Param

        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        tracker = cls(client, run.info.run_id)
        client.log_batch(
            tracker.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        )
        return tracker

    def log_rows(self, rows: list[dict[str, float]], step_key: str = "epoch") -> None:
        """Log per-epoch rows in one batched call (the client splits >1000 metrics)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(key, float(value), now, int(row[step_key]))
            for row in rows
            for key, value in row.items()
            if key != step_key
        ]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_summary(self, summary: dict[str, float]) -> None:
        self.client.log_batch(self.run_id, metrics=_summary_metrics(summary))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_model(self, model, example, registered_name: str | None = None):
        """Log ``model`` (eval mode) with a signature and an input example; return ModelInfo."""
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        model = model.eval()
        example = np.ascontiguousarray(example[:5], dtype=np.float32)
        with torch.no_grad():
            output = model(torch.from_numpy(example)).numpy()
        mlflow.set_tracking_uri(self.client.tracking_uri)
        mlflow.set_registry_uri(self.client.tracking_uri)
        # Logging the model is the run's last step: leaving this block ends the run
        # (FINISHED, or FAILED if logging raised).
        with mlflow.start_run(run_id=self.run_id):
            # pip_requirements given explicitly: inferring them costs ~8 s per model.
            return mlflow.pytorch.log_model(
                model,
                name="model",
                signature=infer_signature(example, output),
                input_example=example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                registered_model_name=registered_name,
            )

    def finish(self) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED")

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """End the run as FAILED (or KILLED) with the reason in the ``fitscope.failure`` tag."""
        self.set_tags({f"{TAG}failure": reason[:8000]})
        self.client.set_terminated(self.run_id, status=status)
