"""What identifies a run and its sweep: the hashed config, the Hydra job, the entry that
started it, the parent run's name and description, and the values handed to sweepers.
"""

from __future__ import annotations

import math
import os
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fitscope.core.errors import FitscopeError
from fitscope.search.storage import describe


def job_info() -> dict[str, str]:
    """Hydra sweep id / job number when running inside a multirun."""
    try:
        hc = HydraConfig.get()
    except ValueError:
        return {}
    if hc.mode != RunMode.MULTIRUN:
        return {}
    return {"fitscope.sweep_dir": str(hc.sweep.dir), "fitscope.job_num": str(hc.job.num)}


def task_overrides() -> list[str]:
    """This job's own overrides (a sweep's jobs each have theirs), without Hydra's."""
    try:
        task = HydraConfig.get().overrides.task
    except ValueError:  # composed outside @hydra.main (the tests, a notebook)
        return []
    return [o for o in task if not o.startswith(("hydra.", "hydra/"))]


def entry_name() -> str:
    """What started this run, for ``mlflow.source.name``: the DVC stage or the console script."""
    stage = os.environ.get("DVC_STAGE")
    return f"dvc stage {stage}" if stage else "fitscope-train"


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without run-specific keys (what the config hash covers)."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_specific = ("paths", "force", "tracking", "progress", "progress_every_s", "trial")
    for key in (*run_specific, "study_description"):
        resolved.pop(key, None)
    # Where and how often checkpoints are written, or metrics sent, does not change what is
    # trained (logger.flush_every predates this rule: kept, so older hashes still match).
    resolved.get("callbacks", {}).pop("checkpoint", None)
    for key in ("flush_every_s", "system_metrics", "system_metrics_every_s"):
        resolved.get("logger", {}).pop(key, None)
    if resolved.get("data", {}).get("chunk_rows", 0) is None:  # the default: hashes unchanged
        resolved["data"].pop("chunk_rows")
    if resolved.get("stage_inputs", 0) is None:  # outside a DVC stage: hashes unchanged
        resolved.pop("stage_inputs")
    return resolved


def recorded_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as a run records it (MLflow, model.pt): a search trial's study
    storage without its database password."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    trial = resolved.get("trial") or {}
    if trial.get("storage"):
        trial["storage"] = describe(trial["storage"])
    return resolved


def finite_value(value: float | None, name: str) -> float:
    """Sweepers crash on NaN or non-floats: always hand back a finite Python float."""
    if value is None or not math.isfinite(value):
        raise FitscopeError(f"{name} is not a finite number ({value}). Fix: see the run's log")
    return float(value)


def parent_run_name(study: str, profile: str, commit: str) -> str:
    """``<study> · <profile> · <commit>``: one parent per study, profile and code version."""
    return f"{study} · {profile} · {commit[:7]}"


STUDY_COMPARE = (
    "Runs: the Training runs tab (MLflow 3 opens on its GenAI overview unless the Model "
    "training switch is on, or the address ends in ?workflowType=machine_learning). "
    "What to compare: each parent run (one per profile and commit) carries the study "
    "report and its comparison table; each variant's run says in its description and its "
    "`fitscope.verdict` tag whether it overfits, underfits or fits well, with `best/*` "
    "metrics at the selected (restored) epoch and `best/gap_loss` (val minus train loss). "
    "Charts: `train/*` against `val/*` per epoch; `learning_curves.png` draws both on one chart."
)


def study_description(cfg: DictConfig) -> str:
    """The MLflow experiment's description: the study (its preset says) and what to compare."""
    about = cfg.study_description or f"Ad hoc runs on {cfg.data.name} (study `{cfg.study}`)."
    return f"{about}\n\n{STUDY_COMPARE}"


def worst_value(objective: str) -> float:
    """What a failed sweep job reports: never NaN (it crashes the Optuna sweeper)."""
    return math.inf if objective.endswith("loss") else -math.inf


def parent_spec(
    study: str, profile: str, key: str, source: dict[str, str], **tags: str
) -> dict[str, Any]:
    """A sweep's parent run as a job (or the sweep) finds or creates it: its ``key``, its
    name (study, profile and git commit) and its tags."""
    commit = source["mlflow.source.git.commit"]
    return {
        "parent_key": key,
        "parent_name": parent_run_name(study, profile, commit),
        "parent_tags": {"fitscope.study": study, "fitscope.profile": profile, **source, **tags},
    }
