"""What a finished fit leaves: history.csv, model.pt, metrics.json (written last: its
presence means the run, its outputs and its tracking are complete), and the run's record
in MLflow (summary, dataset, verdict, files, model), which ends the run FINISHED.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fitscope.core.fileio import atomic_path, write_csv, write_json
from fitscope.model.mlp import ProbabilityModel
from fitscope.pipeline.identity import finite_value, recorded_config
from fitscope.results.contract import metrics_file_key
from fitscope.results.early_stopping import replays
from fitscope.results.figures import run_figure
from fitscope.results.verdict import DIVERGED_FACTOR, describe_run, own_verdict
from fitscope.training.fit import FitResult

log = logging.getLogger(__name__)

RESUME_RUN_FILE = "mlflow_run.json"  # beside last.ckpt: the MLflow run the checkpoint belongs to
# What a finished run leaves in its run directory and logs as artifacts of the same names:
# restore_outputs brings them back. metrics.json last: it says the others are complete.
# The test split's curves (model.metrics.test_curves): for the report and `dvc plots`.
CURVE_FILES = {name: f"{name}.csv" for name in ("calibration", "roc", "pr")}
RUN_FILES = (
    "history.csv",
    "model.pt",
    "learning_curves.png",
    *CURVE_FILES.values(),
    "metrics.json",
)


def write_outputs(
    cfg: DictConfig, dm, run_dir: Path, tracker, result: FitResult, hardware: dict[str, Any]
) -> float:
    """Write the run's files and record, end its MLflow run; return the objective.

    A selected epoch without a finite objective (validation diverged) is a failed run:
    refused before any output is written, so no model.pt or metrics.json claims success.
    ``hardware``: the resolved ``precision`` and ``num_threads``, recorded in metrics.json.
    """
    value = finite_value(result.row[cfg.objective], cfg.objective)
    summary = result.summary()
    verdict = own_verdict(result.rows, result.constant_val_loss)
    if verdict == "diverged":
        log.warning("fitscope: %s %s", cfg.variant, diverged_note(summary))
    _save_files(cfg, run_dir, result)
    metrics: dict[str, Any] = {metrics_file_key(k): v for k, v in summary.items()}
    metrics |= {"seed": cfg.seed, **hardware}
    if tracker is not None:
        metrics |= _track(cfg, dm, tracker, result, summary, run_dir, metrics, verdict)
    # Written last: a metrics.json means the run, its outputs and its tracking are complete.
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "%s: best epoch %d, %s=%.4f (stopped at %d, %.1fs)",
        cfg.variant,
        result.selected,
        cfg.objective,
        value,
        result.stopped,
        result.wall_s,
    )
    return value


def _save_files(cfg: DictConfig, run_dir: Path, result: FitResult) -> None:
    import torch

    run_dir.mkdir(parents=True, exist_ok=True)
    result.history.write_csv(run_dir / "history.csv")
    if cfg.callbacks.checkpoint.save_best:
        with atomic_path(run_dir / "model.pt") as tmp:
            state = {
                "state_dict": result.model.state_dict(),
                "config": recorded_config(cfg),
            }
            torch.save(state, tmp)
    for name, rows in result.curves.items():  # after model.pt: a failed save leaves only history
        write_csv(run_dir / CURVE_FILES[name], rows)


def _track(
    cfg: DictConfig,
    dm,
    tracker,
    result: FitResult,
    summary: dict,
    run_dir: Path,
    metrics: dict,
    verdict: str,
) -> dict[str, Any]:
    """The run's record in MLflow, ended FINISHED; what metrics.json adds about it."""
    added: dict[str, Any] = {"mlflow_run_id": tracker.run_id}
    log_run_record(cfg, dm, tracker, result.rows, summary, run_dir, verdict)
    if cfg.logger.log_model:
        info = tracker.log_model(
            ProbabilityModel(result.model, cfg.data.task),
            dm.tensors["val"][0][:5].numpy(),
            step=result.selected,
            registered_name=cfg.logger.registered_model,
        )
        if info is not None:  # None: the model waits in the pending record
            added["mlflow_model_uri"] = info.model_uri
    tracker.log_dict({**metrics, **added}, "metrics.json")
    tracker.finish()
    if tracker.pending:  # the run id comes with `fitscope runs sync`
        added["mlflow_sync_id"] = tracker.record.sync_id
    return added


def diverged_note(summary: dict[str, float]) -> str:
    """The one line that flags a diverged run (results.verdict's rule)."""
    best, constant = summary["best/val/loss"], summary["fit/constant_val_loss"]
    return (
        f"diverged: best val loss {best:.4g} is over {DIVERGED_FACTOR:g}x a constant "
        f"predictor's {constant:.4f}. Fix: lower optimizer.lr (docs/reliability.md)"
    )


def log_run_record(
    cfg: DictConfig,
    dm,
    tracker,
    rows: list[dict[str, float]],
    summary: dict[str, float],
    run_dir,
    verdict: str,
) -> None:
    """Everything a reviewer reads in the MLflow UI besides the curves: summary metrics at
    the selected epoch, the dataset, the run's own ``verdict`` and description, and the
    run's files."""
    selected = int(summary["fit/best_epoch"])
    tracker.log_summary(summary, step=selected)
    manifest = json.loads(dm.manifest_path.read_text())
    tracker.log_dataset(
        name=cfg.data.name,
        source=str(Path(cfg.data.dir).resolve()),
        digest=dm.manifest_sha256(),
        profile={s: v.get("rows") for s, v in manifest.get("splits", {}).items()},
        context="training",
    )
    note = describe_run(cfg.variant, cfg.profile, verdict, summary, summary, provisional=True)
    tags = {"fitscope.verdict": verdict, "mlflow.note.content": note}
    if verdict == "diverged":
        tags["fitscope.diverged"] = diverged_note(summary)
    tracker.set_tags(tags)
    tracker.log_artifact(run_dir / "history.csv")
    for name in result_curves(run_dir):
        tracker.log_artifact(run_dir / name)
    tracker.log_dict(early_stopping_record(cfg, rows, summary), "early_stopping.json")
    if (run_dir / "model.pt").is_file():  # restore_outputs brings it back from here
        tracker.log_artifact(run_dir / "model.pt")
    tracker.log_dict(recorded_config(cfg), "config/resolved.yaml")
    if (run_dir / ".hydra").is_dir():
        tracker.log_artifacts(run_dir / ".hydra", "config/hydra")
    figure = run_figure(rows, cfg.variant, selected, run_dir / "learning_curves.png")
    tracker.log_artifact(figure)


def result_curves(run_dir: Path) -> list[str]:
    """The curve files a run wrote (ROC and PR for a binary task only)."""
    return [name for name in CURVE_FILES.values() if (run_dir / name).is_file()]


def early_stopping_record(cfg, rows: list[dict[str, float]], summary: dict) -> dict:
    """What early stopping bought this run: the test metrics of the selected epoch against
    the last one trained, and the epoch each patience of ``PATIENCES`` would have chosen."""
    es = cfg.callbacks.early_stopping
    return {
        "monitor": es.monitor,
        "selected_epoch": int(summary["fit/best_epoch"]),
        "last_epoch": int(summary["fit/stopped_epoch"]),
        "test_selected": {k: v for k, v in summary.items() if k.startswith("test/")},
        "test_last": {k: v for k, v in summary.items() if k.startswith("last_epoch/test/")},
        "patience_replay": [r.as_dict() for r in replays(rows, es.monitor, es.mode, es.min_delta)],
    }


def restore_outputs(client, run_id: str, run_dir: Path) -> bool:
    """Put a finished run's files back into ``run_dir`` from its MLflow artifacts (a DVC
    stage re-run after an interrupt: DVC deleted the stage's outputs). False, with nothing
    written, when the run lacks one of them."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=run_dir) as tmp:  # same filesystem: moves are renames
        try:  # any artifact store (a proxy's HTTP errors, S3's, GCS's): retrain if it fails
            logged = {a.path for a in client.list_artifacts(run_id)}
            wanted = [name for name in RUN_FILES if name in logged]
            if "metrics.json" not in wanted or "history.csv" not in wanted:
                return False
            for name in wanted:
                client.download_artifacts(run_id, name, tmp)
        except Exception as exc:
            log.warning("could not restore run %s's files: %s", run_id, exc)
            return False
        for name in wanted:  # in RUN_FILES order: metrics.json last
            shutil.move(Path(tmp) / name, run_dir / name)
    return True
