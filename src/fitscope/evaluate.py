"""Score a variant's best model(s) on the held-out test split (the DVC evaluate stage)."""

from __future__ import annotations

import json
import pickle
import statistics
from pathlib import Path
from typing import Any

import torch
from torchmetrics.functional.classification import multiclass_accuracy

from fitscope.datamodules import split_tensors
from fitscope.errors import FitscopeError
from fitscope.fileio import write_json
from fitscope.models import build_mlp_from_config
from fitscope.training import classification_metrics

SCORE_ROWS = 65_536  # rows per forward pass when scoring


def load_trained(run_dir: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the MLP saved in ``run_dir/model.pt`` (best weights) and return its config."""
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise FitscopeError(f"{path} not found. Fix: run the train stage first (`dvc repro`)")
    try:
        # weights_only: a model.pt is data (tensors, plain config values), never code.
        saved = torch.load(path, map_location="cpu", weights_only=True)
        cfg, state = saved["config"], saved["state_dict"]
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FitscopeError(
            f"refusing to load {path}: not a fitscope model file of plain weights ({first[:200]}). "
            "Fix: retrain it (`dvc repro -f -s train@<variant>`); never load files you did not make"
        ) from None
    # The weights come from the file, so the initializer is irrelevant (skip it).
    mlp = build_mlp_from_config(cfg, state["0.weight"].shape[1], init="torch_default")
    mlp.load_state_dict(state)
    return mlp.eval(), cfg


def _score(
    mlp: torch.nn.Module,
    cfg: dict[str, Any],
    x: torch.Tensor,
    targets: torch.Tensor,
    per_class: bool = False,
) -> dict[str, float]:
    task, num_classes = cfg["data"]["task"], cfg["data"]["num_classes"]
    with torch.no_grad():  # in slices: 10.5M full-HIGGS rows at once need GBs of activations
        logits = torch.cat([mlp(part) for part in x.split(SCORE_ROWS)])
    metrics = classification_metrics(task, logits, targets, num_classes)
    if per_class and task == "multiclass":
        accs = multiclass_accuracy(
            logits.softmax(-1), targets, num_classes=num_classes, average=None
        )
        metrics.update({f"acc_class_{k}": float(a) for k, a in enumerate(accs)})
    return metrics


def evaluate_run(run_dir: str | Path, data_dir: str | Path | None = None) -> dict[str, float]:
    """Test-split metrics of one trained run, plus its training loss in eval mode.

    The training loss logged during training has dropout active (as in Keras); the
    eval-mode one is what "how well does the model fit its training data" means.
    """
    mlp, cfg = load_trained(run_dir)
    data_dir = data_dir or cfg["data"]["dir"]
    task = cfg["data"]["task"]
    result = _score(mlp, cfg, *split_tensors(data_dir, "test", task), per_class=True)
    train = split_tensors(data_dir, "train", task, cfg["data"].get("train_size"))
    result["train_eval_loss"] = _score(mlp, cfg, *train)["loss"]
    return result


def seed_dirs(variant_dir: str | Path) -> list[Path]:
    """The per-seed run directories of a variant (``runs/<variant>/<job>``)."""
    dirs = sorted(p.parent for p in Path(variant_dir).glob("*/metrics.json"))
    if not dirs:
        raise FitscopeError(f"no trained runs in {variant_dir}. Fix: run `dvc repro` first")
    return dirs


def evaluate_variant(
    variant: str, runs_root: str | Path = "runs", out_dir: str | Path = "metrics"
) -> dict[str, Any]:
    """Score every seed of ``variant``; write ``metrics/<variant>.json``.

    The file holds the mean over seeds (and ``*_std`` with several seeds); per-class
    accuracies go to the MLflow runs only, to keep `dvc metrics show` readable.
    """
    dirs = seed_dirs(Path(runs_root) / variant)
    per_seed = [evaluate_run(d) for d in dirs]
    result: dict[str, Any] = {"seeds": len(per_seed)}
    for key in per_seed[0]:
        if key.startswith("acc_class_"):
            continue
        values = [m[key] for m in per_seed]
        name = key if key.startswith("train_") else f"test_{key}"
        result[name] = statistics.fmean(values)
        if len(values) > 1:
            result[f"{name}_std"] = statistics.stdev(values)
    _log_to_mlflow(dirs, per_seed)
    write_json(Path(out_dir) / f"{variant}.json", result)
    return result


def _log_to_mlflow(dirs: list[Path], per_seed: list[dict[str, float]]) -> None:
    """Attach the test metrics to each seed's MLflow run (when it was tracked)."""
    from fitscope.tracking import RunTracker, get_client

    client = None
    for run_dir, metrics in zip(dirs, per_seed, strict=True):
        run_id = json.loads((run_dir / "metrics.json").read_text()).get("mlflow_run_id")
        if run_id:
            client = client or get_client()
            RunTracker(client, run_id).log_summary(
                {
                    k.replace("train_eval_", "train_eval/")
                    if k.startswith("train_")
                    else f"test/{k}": v
                    for k, v in metrics.items()
                }
            )
