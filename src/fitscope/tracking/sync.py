"""``fitscope runs sync``: uploading the records of runs that trained while the tracking
server was unreachable, idempotently.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitscope.core.process import Owner
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.liveness import dead_reason, run_owner
from fitscope.tracking.offline import PendingRecord, spool_dir
from fitscope.tracking.outcomes import FINISHED, KILLED, RUNNING, Outcome, end_run
from fitscope.tracking.parents import close_parent, find_or_create_parent
from fitscope.tracking.run import RunTracker
from fitscope.tracking.store import STALE_AFTER_ENV, STALE_AFTER_S, env_seconds
from fitscope.tracking.tags import (
    CONFIG_HASH_TAG,
    DUPLICATE_TAG,
    FAILURE_TAG,
    FINISHED_FILTER,
    PARENT_TAG,
    RECONCILED_TAG,
    SYNC_ID_TAG,
    tag_equals,
)


@dataclass(frozen=True)
class Synced:
    """What :func:`sync_pending` did with one record."""

    sync_id: str
    run_id: str | None
    note: str
    done: bool


# Rebuilds a logged model from a record's resolved config, saved weights and the number of
# input features (fitscope.model.mlp.model_from_weights): the model layer's, passed in.
ModelBuilder = Callable[[dict[str, Any], dict[str, Any], int], Any]


def sync_pending(
    client, spool: Path | None = None, *, build_model: ModelBuilder | None = None
) -> list[Synced]:
    """Upload every pending record in ``spool`` to ``client``'s server; idempotent.

    Each record's run is found by its run id or its ``fitscope.sync_id`` tag before one is
    created; only params, metric points (by key and step), dataset inputs and the model
    that the server lacks are sent; artifacts are uploaded again (same paths); the run gets
    the record's final status (a record whose process died while RUNNING ends KILLED).
    The record is deleted last, so a sync cut short is simply run again. Records still
    written by a live process, or made for another server, are left alone. The parents
    of synced runs are closed again (best child, counts) unless a live sweep holds them.
    A record that holds a model needs ``build_model`` to rebuild it before logging.
    """
    spool = spool or spool_dir()
    results, parents = [], set()
    for record in PendingRecord.all(spool):
        with record.lock() as held:
            data = record.data
            skip = None
            if not held:
                skip = "another sync holds it"
            elif data["status"] == "RUNNING" and record.owner_alive():
                skip = f"still written by its run ({Owner.parse(data['owner'])})"
            elif data["tracking_uri"] != client.tracking_uri:
                skip = f"made for {data['tracking_uri']}: set MLFLOW_TRACKING_URI to it to sync"
            if skip is not None:
                results.append(Synced(record.sync_id, data["run_id"], skip, False))
                continue
            run_id, parent, note = _sync_record(client, record, build_model)
            if parent:
                parents.add(parent)
            record.delete()
            results.append(Synced(record.sync_id, run_id, note, True))
    for parent in sorted(parents):
        run = client.get_run(parent)
        stale = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
        mine = run_owner(run) == Owner.current()
        if run.info.status != "RUNNING" or mine or dead_reason(run, stale) is not None:
            close_parent(client, parent)
    return results


def _find_run(client, experiment_id: str, run_id: str | None, sync_id: str):
    from mlflow.exceptions import MlflowException

    if run_id:
        with contextlib.suppress(MlflowException):
            return client.get_run(run_id)
    runs = client.search_runs([experiment_id], filter_string=tag_equals(SYNC_ID_TAG, sync_id))
    return runs[0] if runs else None


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _sync_record(
    client, record: PendingRecord, build_model: ModelBuilder | None
) -> tuple[str, str | None, str]:
    """Make the server hold ``record``'s run; returns (run id, parent id, what was sent)."""
    data = record.data
    exp_id = ensure_experiment(client, data["experiment"], data.get("experiment_description"))
    parent = data.get("parent_run_id")
    if not parent and data.get("parent_key"):
        parent = find_or_create_parent(
            client, exp_id, data["parent_key"], data["parent_name"], data.get("parent_tags")
        )
    tags = {**data["tags"], SYNC_ID_TAG: record.sync_id}
    if parent:
        tags[PARENT_TAG] = parent
    run = _find_run(client, exp_id, data["run_id"], record.sync_id)
    if run is None:
        run = client.create_run(
            exp_id, start_time=data["start_time"], tags=tags, run_name=data["run_name"]
        )
    run_id = run.info.run_id
    record.update(run_id=run_id)  # a sync cut short finds this run again by id
    if data.get("claimed") is False:  # trained offline: another run may have the config
        duplicate = _finished_twin(client, exp_id, tags.get(CONFIG_HASH_TAG, ""), run_id)
        if duplicate is not None:
            tags[DUPLICATE_TAG] = duplicate
    params = _send_params_and_tags(client, run, data["params"], tags)
    sent = _send_metrics(client, run_id, record)
    _send_datasets_and_files(client, run, record)
    model = "no model"
    if data.get("model"):
        model = "model already there"
        if not _has_model(client, exp_id, run_id):
            _log_pending_model(client, run_id, record, build_model)
            model = "model logged"
    status = _end_synced_run(client, run_id, data)
    files = len(data["artifacts"])
    note = f"{params} param(s), {sent} metric point(s), {files} file(s), {model}, {status}"
    if DUPLICATE_TAG in tags:
        note += f"; config already finished in run {tags[DUPLICATE_TAG]} (tagged {DUPLICATE_TAG})"
    return run_id, parent, note


def _finished_twin(client, exp_id: str, chash: str, run_id: str) -> str | None:
    """The first other FINISHED run of config ``chash``, if any."""
    others = client.search_runs(
        [exp_id], filter_string=tag_equals(CONFIG_HASH_TAG, chash) + FINISHED_FILTER
    )
    first = min(
        (r for r in others if r.info.run_id != run_id),
        key=lambda r: r.info.start_time,
        default=None,
    )
    return first.info.run_id if first is not None else None


def _send_params_and_tags(client, run, params: dict[str, str], tags: dict[str, str]) -> int:
    """The params the server lacks (a param cannot change) and every tag; how many params."""
    from mlflow.entities import Param, RunTag

    run_id = run.info.run_id
    new = [Param(k, v) for k, v in sorted(params.items()) if k not in run.data.params]
    for chunk in _chunks(new, 100):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], 100):
        client.log_batch(run_id, tags=chunk)
    return len(new)


def _send_metrics(client, run_id: str, record: PendingRecord) -> int:
    """The metric points the server lacks (by key and step); how many were sent."""
    from mlflow.entities import Metric

    by_key: dict[str, list] = {}
    for key, value, stamp, step in record.metrics():
        by_key.setdefault(key, []).append(Metric(key, value, stamp, step))
    sent = 0
    for key, points in by_key.items():
        have = {m.step for m in client.get_metric_history(run_id, key)}
        new = {m.step: m for m in points if m.step not in have}  # one point per step
        if new:
            client.log_batch(run_id, metrics=list(new.values()))
            sent += len(new)
    return sent


def _send_datasets_and_files(client, run, record: PendingRecord) -> None:
    """The dataset inputs the run lacks, and its artifacts (uploaded again: same paths)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    run_id, data = run.info.run_id, record.data
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs} if run.inputs else set()
    for ds in data["datasets"]:
        if ds["digest"][:36] not in digests:
            dataset = Dataset(
                name=ds["name"],
                digest=ds["digest"][:36],
                source_type="local",
                source=json.dumps({"uri": ds["source"]}),
                profile=json.dumps(ds["profile"]),
            )
            tag = InputTag("mlflow.data.context", ds["context"])
            client.log_inputs(run_id, datasets=[DatasetInput(dataset, [tag])])
    for name, artifact_path in data["artifacts"]:
        src = record.path / "files" / name
        if src.is_dir():
            client.log_artifacts(run_id, str(src), artifact_path)
        else:
            client.log_artifact(run_id, str(src), artifact_path)


def _end_synced_run(client, run_id: str, data: dict[str, Any]) -> str:
    """End the uploaded run with the record's status (KILLED when its process died before
    closing it), unless another live process took it over; the status it has now."""
    status = data["status"]
    if status == RUNNING:  # its process died before it closed the record
        status = KILLED
        reason = "its process ended before the run was closed (uploaded by fitscope runs sync)"
        data["tags"][FAILURE_TAG] = reason
    current = client.get_run(run_id)
    stale = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
    owner = run_owner(current)
    if (
        current.info.status == RUNNING
        and owner not in (None, Owner.parse(data["owner"]))
        and dead_reason(current, stale) is None
    ):
        return RUNNING  # another live process took the run over: it closes it
    if RECONCILED_TAG in current.data.tags and RECONCILED_TAG not in data["tags"]:
        client.delete_tag(run_id, RECONCILED_TAG)  # a reconcile while the server was cut off
    reason = None if status == FINISHED else data["tags"].get(FAILURE_TAG, "no reason recorded")
    end_run(client, run_id, Outcome(status, reason), current.data.tags, data["end_time"])
    return status


def _has_model(client, experiment_id: str, run_id: str) -> bool:
    models = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return any(str(m.status).endswith("READY") for m in models)


def _log_pending_model(
    client, run_id: str, record: PendingRecord, build_model: ModelBuilder | None
) -> None:
    """Rebuild the record's model from its config and weights and log it to the run."""
    import numpy as np
    import torch

    if build_model is None:
        raise ValueError("a pending record with a model needs build_model to sync it")
    folder = record.path / "model"
    state = torch.load(folder / "model.pt", weights_only=True)
    example = np.load(folder / "example.npy")
    model = build_model(record.data["config"], state, example.shape[1])
    spec = record.data["model"]
    RunTracker(client, run_id).log_model(model, example, spec["step"], spec["registered_name"])
