"""The whole study timed as a user runs it (``--study``): ``dvc repro`` in a scratch copy,
and its hardware floor: the matmul FLOPs of the epochs its runs trained over what every
core of this machine does at its measured peak."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fitscope.data.splits import read_manifest
from fitscope.pipeline.diagnostics import drop_diagnostics
from fitscope.pipeline.schedule import run_epoch_flop
from fitscope.results.contract import read_comparison_csv


def time_study(
    profile: str,
    peak_gflops: Callable[[str], float],
    cores: int,
    one_variant_per_dataset: bool = False,
) -> dict[str, Any]:
    """Wall minutes of ``dvc repro`` (the study, ``study.profile=profile``) in a scratch copy
    of this checkout (what git tracks plus untracked, unignored files), with its own
    MLflow store: nothing here is touched; and its floor (:func:`floor_minutes`), from
    ``peak_gflops(precision)`` of one core and ``cores``. ``one_variant_per_dataset``: only
    the first variant of each dataset, seed 0 (``--smoke``)."""
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    listed = subprocess.check_output(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, text=True
    )
    with tempfile.TemporaryDirectory(prefix="fitscope-study-") as tmp:
        copy = Path(tmp) / "repo"
        for name in filter(None, listed.split("\0")):
            if (root / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, copy / name)
        params = copy / "params.yaml"
        params.write_text(params.read_text().replace("profile: classic", f"profile: {profile}", 1))
        if one_variant_per_dataset:
            values = yaml.safe_load(params.read_text())
            values["study"] |= {"seeds": "0", "jobs": 1}
            values["variants"] = {
                d: dict([next(iter(v.items()))]) for d, v in values["variants"].items()
            }
            params.write_text(yaml.safe_dump(values, sort_keys=False))
            drop_diagnostics(copy)  # they train variants this copy no longer has
        git = ["git", "-c", "user.email=bench@fitscope.invalid", "-c", "user.name=bench"]
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "s"]):
            subprocess.run(cmd, cwd=copy, check=True, capture_output=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}"}
        # The stages import the copy's code, whichever checkout the venv was installed from.
        paths = [str(copy / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        env.pop("FITSCOPE_PARENT_RUN_ID", None)
        # The stages call `fitscope`: the venv's scripts first on PATH, as `make` puts them.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        dvc = Path(sys.executable).with_name("dvc")
        start = time.perf_counter()
        subprocess.run([str(dvc), "repro"], cwd=copy, env=env, check=True)
        minutes = (time.perf_counter() - start) / 60
        floor = floor_minutes(copy, peak_gflops, cores)
        reference = root / "docs" / "results" / profile / "comparison.csv"
        drift = fidelity(copy / "reports" / "comparison.csv", reference)
    if floor <= 0:
        raise RuntimeError("the study left no run with a metrics.json: no floor to compare with")
    return {
        "study_minutes": minutes,
        "study_floor_minutes": floor,
        "study_floor_ratio": minutes / floor,
        **drift,
    }


def fidelity(comparison: Path, reference: Path) -> dict[str, Any]:
    """The study's results against the published ones of its profile (docs/results): each
    variant's best val loss, selected epoch and verdict, then and now, the largest
    val-loss difference, how many (majority) verdicts changed and how many published
    variants the study lacks. A speed-up must leave these as they were (issue 22: within
    0.01, the same verdicts). Without published results every figure is None, so that
    reports/bench.json keeps no earlier run's figures beside this run's."""
    if not reference.is_file() or not comparison.is_file():
        return dict.fromkeys(FIDELITY_KEYS)
    then, now = read_comparison_csv(reference), read_comparison_csv(comparison)
    shared = [variant for variant in then if variant in now]
    table = {
        v: {key: [then[v][key], now[v][key]] for key in ("val loss", "selected epoch", "verdict")}
        for v in shared
    }
    deltas = [
        abs(_leading_float(now[v]["val loss"]) - _leading_float(then[v]["val loss"]))
        for v in shared
    ]
    changed = sum(_majority(then[v]["verdict"]) != _majority(now[v]["verdict"]) for v in shared)
    return {
        "study_fidelity": table,
        "study_val_loss_max_delta": max(deltas, default=0.0),
        "study_verdicts_changed": changed,
        "study_variants_missing": len(then) - len(shared),
    }


FIDELITY_KEYS = (
    "study_fidelity",
    "study_val_loss_max_delta",
    "study_verdicts_changed",
    "study_variants_missing",
)


def _leading_float(cell: str) -> float:
    """``0.5731`` of ``0.5731`` or ``0.5731 ± 0.0012`` (several seeds)."""
    return float(cell.split()[0])


def _majority(cell: str) -> str:
    """``good fit`` of ``good fit`` or ``good fit (4/6 seeds), overfitting (2/6 seeds)``
    (results.verdict.seed_count lists the most frequent first)."""
    return cell.split(" (")[0]


def floor_minutes(repo: Path, peak_gflops: Callable[[str], float], cores: int) -> float:
    """The study's hardware floor: for every run in ``repo/runs``, the matmul FLOPs of the
    epochs it trained (its model's layer shapes, its split's rows: schedule.run_epoch_flop)
    at ``peak_gflops`` of the precision it trained in, spread over ``cores`` cores."""
    seconds = 0.0
    peaks: dict[str, float] = {}
    splits: dict[str, dict] = {}  # per dataset, from its manifest
    for metrics_file in sorted((repo / "runs").glob("*/*/*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        config = yaml.safe_load((metrics_file.parent / ".hydra" / "config.yaml").read_text())
        data = config["data"]
        if data["name"] not in splits:
            splits[data["name"]] = read_manifest(repo / "data/processed" / data["name"])["splits"]
        flop = run_epoch_flop(data, config["model"], splits[data["name"]])
        precision = metrics["precision"]
        if precision not in peaks:
            peaks[precision] = peak_gflops(precision)
        seconds += metrics["epochs_run"] * flop / (peaks[precision] * 1e9)
    return seconds / cores / 60
