"""The DVC evaluate stage: each variant's test metrics averaged over its seeds, one metrics
file a dataset. Each training job scored its model in its own process; this stage only
averages (it imports neither torch nor MLflow).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import write_json
from fitscope.results.contract import SCORE_KEYS


def seed_dirs(variant_dir: str | Path) -> list[Path]:
    """The per-seed run directories of a variant (``runs/<dataset>/<variant>/<seed>``), in
    seed order (2 before 10)."""
    dirs = sorted(
        (p.parent for p in Path(variant_dir).glob("*/metrics.json")), key=lambda d: seed_key(d.name)
    )
    if not dirs:
        raise FitscopeError(f"no trained runs in {variant_dir}. Fix: run `dvc repro` first")
    return dirs


def seed_key(name: str) -> tuple[int, str]:
    """Sorts seed names (run directory names) as seeds: 2 before 10."""
    return (int(name), "") if name.isdigit() else (-1, name)


def run_setting(run_dir: Path, key: str) -> Any:
    """The value of config key ``key`` (dotted) that the run in ``run_dir`` composed, from
    Hydra's ``.hydra/config.yaml`` there (plain YAML, read safely); None without it."""
    import yaml

    path = Path(run_dir) / ".hydra" / "config.yaml"
    value: Any = yaml.safe_load(path.read_text()) if path.is_file() else None
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _seed_scores(run_dir: Path) -> dict[str, float]:
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FitscopeError(f"cannot read {path} ({exc}). Fix: retrain the variant") from None
    scores = {k: metrics[k] for k in SCORE_KEYS if isinstance(metrics, dict) and k in metrics}
    if "test_loss" not in scores:
        raise FitscopeError(
            f"{path} has no test metrics (written by an older fitscope, or not by fitscope). "
            "Fix: retrain it (`dvc repro -f -s train@<dataset>`)"
        )
    return scores


def variant_scores(variant_dir: str | Path) -> dict[str, Any]:
    """The mean over seeds of a variant's test metrics (and ``*_std`` with several seeds)."""
    per_seed = [_seed_scores(d) for d in seed_dirs(variant_dir)]
    result: dict[str, Any] = {"seeds": len(per_seed)}
    for key in per_seed[0]:
        values = [m[key] for m in per_seed if key in m]
        result[key] = statistics.fmean(values)
        if len(values) > 1:
            result[f"{key}_std"] = statistics.stdev(values)
    return result


def evaluate_dataset(
    dataset: str, runs_root: str | Path = "runs", out_dir: str | Path = "metrics"
) -> dict[str, dict[str, Any]]:
    """Score every variant trained in ``runs/<dataset>``; write ``metrics/<dataset>.json``.

    One entry per variant (``dvc metrics show`` prints ``<variant>.test_loss`` ...);
    per-class accuracies are in the MLflow runs only, to keep that table readable.
    """
    root = Path(runs_root) / dataset
    variants = sorted({p.parent.parent.name for p in root.glob("*/*/metrics.json")})
    if not variants:
        raise FitscopeError(f"no trained runs in {root}. Fix: run `dvc repro` first")
    result = {name: variant_scores(root / name) for name in variants}
    write_json(Path(out_dir) / f"{dataset}.json", result)
    return result
