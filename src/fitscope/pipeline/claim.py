"""A run's claim on its config in MLflow (one config trains once, even when identical jobs
race), the offline fallback when the server is down, and resuming an interrupted run.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fitscope.core.errors import first_line
from fitscope.pipeline.identity import (
    entry_name,
    finite_value,
    job_info,
    parent_spec,
    recorded_config,
    run_config,
    study_description,
    task_overrides,
    worst_value,
)
from fitscope.pipeline.outputs import RESUME_RUN_FILE, restore_outputs
from fitscope.tracking.claims import claim_run, take_over
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.liveness import run_owner
from fitscope.tracking.parents import find_or_create_parent
from fitscope.tracking.run import RunTracker, open_record
from fitscope.tracking.store import get_client, resolve_tracking_uri, server_down
from fitscope.tracking.tags import (
    CONFIG_HASH_TAG,
    OFFLINE_NOTE,
    OFFLINE_TAG,
    PARENT_SPEC_ENV,
    PARENT_TAG,
    commit_parent_key,
    config_hash,
    flatten,
    source_tags,
    sweep_parents,
)
from fitscope.training.checkpoints import set_aside_if_unreadable

log = logging.getLogger(__name__)


def checkpoint_dir(cfg: DictConfig, chash: str) -> Path:
    """Where this config's resume checkpoint lives: ``<dir>/<study>/<config hash>/``."""
    return Path(cfg.callbacks.checkpoint.dir) / cfg.study / chash


def resume_point(cfg: DictConfig, chash: str, ckpt_dir: Path, opened: OpenedRun) -> dict[str, Any]:
    """How ``_fit`` starts: from ``last.ckpt`` of an interrupted run of this config, if any.

    With MLflow, the interrupted (KILLED) run is continued: it replaces the new claim run,
    and only epochs after the last one it logged are sent. An unreadable checkpoint is set
    aside with one warning line and the claim's new run starts afresh.
    """

    ckpt = ckpt_dir / "last.ckpt"
    run_file = ckpt_dir / RESUME_RUN_FILE
    # A checkpoint that cannot be read is moved beside its directory; the interrupted
    # run stays KILLED and this claim's new run trains from scratch (docs/reliability.md).
    if not ckpt.is_file() or not set_aside_if_unreadable(ckpt, ckpt_dir.parent / chash):
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # a run file without a checkpoint
        return {}
    logged_through = -1
    if opened.tracker is not None and not opened.tracker.offline:
        previous = json.loads(run_file.read_text())["run_id"] if run_file.is_file() else None
        taken = previous and take_over(opened.client, opened.tracker, previous, chash, "val/loss")
        if not taken:  # that run is gone or did not end KILLED: start afresh
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            return {}
        record = opened.tracker.record
        opened.tracker, logged_through = taken
        if record is not None:  # the record now follows the run this process continues
            opened.tracker.record = record
            record.update(run_id=opened.tracker.run_id)
    log.info("resuming %s from %s", cfg.variant, ckpt)
    return {"resume_from": ckpt, "logged_through": logged_through}


@dataclass
class OpenedRun:
    """What a training run opened in MLflow, for the way out whatever happens."""

    client: Any = None
    tracker: Any = None  # the run (tracking.RunTracker), once the config is claimed
    own_parent: str | None = None  # a parent run this run opened itself
    precision: str = "32-true"  # trainer.precision as resolved on this machine (auto)
    num_threads: int = 1  # trainer.num_threads as resolved for this process (auto)
    fitting: bool = False  # training started: only then can a failure spoil the checkpoint
    outcome: str = "failed"  # how the job ends: ok, failed or interrupted


@dataclass
class ClaimRequest:
    """What a run claims its config with, and keeps in its record."""

    uri: str
    chash: str
    params: dict[str, Any]
    tags: dict[str, str]
    record: dict[str, Any]
    parent: str | None  # the sweep's parent run, when the sweep made one
    parent_spec: dict[str, Any] | None  # the parent this run finds or creates itself


def claim_or_resume(cfg: DictConfig, dm, guard, opened: OpenedRun) -> float | None:
    """Claim this config with a RUNNING run (``opened.tracker``); the value to return if
    the job is skipped instead (a FINISHED run has it, or a live run holds it).

    A tracking server that does not answer (refused, timed out) does not stop the run: it
    trains without a claim into a pending record (tracking.run.open_record) that
    ``fitscope runs sync`` uploads later.
    """
    request = _request(cfg, dm, opened)
    try:
        claim = _claim_online(cfg, request, guard, opened, force=cfg.force)
        if not _outputs_in_place(cfg, claim, opened.client):
            claim = _claim_online(cfg, request, guard, opened, force=True)
    except Exception as exc:
        if not server_down(request.uri, exc):
            raise
        _train_offline(cfg, request, opened, exc)
        return None
    return _skipped_value(cfg, claim)


def _outputs_in_place(cfg: DictConfig, claim, client) -> bool:
    """A DVC stage's job skips a finished config only with that run's files in its run
    directory (the stage's output, which DVC deletes before re-running the stage): they
    are restored from the run's artifacts, else the config trains again."""
    if claim.finished is None or cfg.stage_inputs is None:
        return True
    run_dir, run_id = Path(cfg.paths.run_dir), claim.finished.info.run_id
    try:
        if json.loads((run_dir / "metrics.json").read_text()).get("mlflow_run_id") == run_id:
            return True
    except (OSError, ValueError):
        pass
    if restore_outputs(client, run_id, run_dir):
        log.info("%s: run %s's files restored into %s from MLflow", cfg.variant, run_id, run_dir)
        return True
    log.warning(
        "run %s finished %s, but its files are neither in %s nor in MLflow: training it again",
        run_id,
        cfg.variant,
        run_dir,
    )
    return False


def _request(cfg: DictConfig, dm, opened: OpenedRun) -> ClaimRequest:
    run_cfg = run_config(cfg)
    source = source_tags(entry_name())
    tags = {
        "fitscope.variant": cfg.variant,
        "fitscope.dataset": cfg.data.name,
        "fitscope.study": cfg.study,
        "fitscope.profile": cfg.profile,
        "fitscope.overrides": " ".join(task_overrides()),
        "fitscope.data_manifest_sha256": dm.manifest_sha256(),
        **source,
        "fitscope.precision": opened.precision,
        "fitscope.num_threads": str(opened.num_threads),
        **job_info(),
    }
    record = {
        "experiment_description": study_description(cfg),
        "config": recorded_config(cfg),
    }
    # The parent this run finds or creates itself: its sweep's, when the sweep started with
    # the server unreachable, or the one named by tracking.parent_key for a single run.
    spec = sweep_parents(PARENT_SPEC_ENV).get(cfg.study)
    if spec is None and cfg.tracking.parent_key:
        key = commit_parent_key(cfg.tracking.parent_key, source["mlflow.source.git.commit"])
        spec = parent_spec(cfg.study, cfg.profile, key, source)
    return ClaimRequest(
        uri=resolve_tracking_uri(),
        chash=config_hash(run_cfg),
        params=flatten(run_cfg),
        tags=tags,
        record=record,
        parent=sweep_parents().get(cfg.study),
        parent_spec=spec,
    )


def _claim_online(cfg: DictConfig, req: ClaimRequest, guard, opened: OpenedRun, *, force: bool):
    client = opened.client = get_client(req.uri)
    exp_id = ensure_experiment(client, cfg.study, study_description(cfg))
    if not req.parent and req.parent_spec:
        req.parent = opened.own_parent = find_or_create_parent(
            client,
            exp_id,
            req.parent_spec["parent_key"],
            run_name=req.parent_spec["parent_name"],
            tags=req.parent_spec["parent_tags"],
        )
    if req.parent:
        req.tags[PARENT_TAG] = req.parent
    with guard.shield():  # a signal waits until the claim is settled either way
        claim = claim_run(client, exp_id, req.chash, cfg.variant, req.params, req.tags, force=force)
        opened.tracker = claim.tracker
        if claim.tracker is not None:
            claim.tracker.record = open_record(
                req.uri,
                cfg.study,
                cfg.variant,
                req.params,
                {**req.tags, CONFIG_HASH_TAG: req.chash},
                run_id=claim.tracker.run_id,
                parent_run_id=req.parent,
                **req.record,
            )
    return claim


def _train_offline(cfg: DictConfig, req: ClaimRequest, opened: OpenedRun, exc) -> None:
    """The server is down: train into a pending record, with no claim."""
    if not req.parent and req.parent_spec:
        req.record.update(req.parent_spec)
    opened.client, opened.own_parent = None, None
    tags = {**req.tags, CONFIG_HASH_TAG: req.chash, OFFLINE_TAG: OFFLINE_NOTE}
    record = open_record(
        req.uri,
        cfg.study,
        cfg.variant,
        req.params,
        tags,
        parent_run_id=req.parent,
        claimed=False,
        **req.record,
    )
    opened.tracker = RunTracker(None, None, record)
    opened.tracker.go_offline(f"before the run started: {first_line(exc)}")


def _skipped_value(cfg: DictConfig, claim) -> float | None:
    """The value a skipped job returns (None: the claim is ours, train)."""
    for gone in claim.reconciled:
        log.warning(
            "run %s (%s) was left RUNNING: now KILLED, %s", gone.run_id, gone.run_name, gone.reason
        )
    if claim.finished is not None:
        log.info(
            "skipping %s: run %s already finished with this config (force=true re-runs it)",
            cfg.variant,
            claim.finished.info.run_id,
        )
        return finite_value(claim.finished.data.metrics.get(f"best/{cfg.objective}"), cfg.objective)
    if claim.holder is not None:
        log.info(
            "skipping %s: already running in %s (MLflow run %s)",
            cfg.variant,
            run_owner(claim.holder) or "another process",
            claim.holder.info.run_id,
        )
        return worst_value(cfg.objective)
    return None
