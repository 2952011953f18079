"""The verdict rule on synthetic curves, and the report writer on synthetic runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fitscope.core.errors import FitscopeError
from fitscope.report.study import write_study_report
from fitscope.results.verdict import verdict
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.run import RunTracker
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import PARENT_TAG


def curve(train, val):
    return [
        {"epoch": i, "train/loss": t, "val/loss": v}
        for i, (t, v) in enumerate(zip(train, val, strict=True))
    ]


def test_the_patience_replay_follows_lightnings_early_stopping_rule():
    from fitscope.results.early_stopping import patience_replay, replays

    values = [1.0, 0.8, 0.9, 0.85, 0.95, 0.7, 0.75]
    # Patience 2: two epochs without improving on 0.8 (epochs 2 and 3): stops at epoch 3.
    assert patience_replay(values, 2).as_dict() == {
        "patience": 2,
        "selected_epoch": 1,
        "value": 0.8,
        "stopped_epoch": 3,
        "epochs_saved": 3,
    }
    # Patience 4: epoch 5 improves as the wait would end; the history ends first.
    late = patience_replay(values, 4)
    assert (late.selected_epoch, late.value, late.stopped_epoch, late.epochs_saved) == (
        5,
        0.7,
        None,
        0,
    )
    assert patience_replay(values, 2, min_delta=0.25).selected_epoch == 0  # 0.2 is not enough
    accuracy = patience_replay([0.1, 0.5, 0.4, 0.3], 2, mode="max")
    assert (accuracy.selected_epoch, accuracy.value, accuracy.stopped_epoch) == (1, 0.5, 3)
    rows = [{"val/loss": v} for v in values]
    assert [r.patience for r in replays(rows)] == [10, 20, 50, 100, 200]
    # As Lightning: the wait counts from before epoch 0, a non-finite value never improves.
    nan = float("nan")
    never = patience_replay([nan, nan, nan], 2)
    assert (never.selected_epoch, never.stopped_epoch, never.epochs_saved) == (None, 1, 1)
    late_start = patience_replay([nan, 0.5, 0.4], 2)
    assert (late_start.selected_epoch, late_start.value, late_start.stopped_epoch) == (
        2,
        0.4,
        None,
    )


def test_val_rising_while_train_falls_is_overfitting():
    hist = curve(train=[0.7, 0.6, 0.5, 0.4, 0.3], val=[0.70, 0.62, 0.60, 0.64, 0.70])
    assert verdict(hist, best_val_in_dataset=0.60) == "overfitting"


def test_noisy_validation_is_not_overfitting():
    # 40 epochs: the last 4 average 0.5975 (+1.3% over the best, 0.59), though a single
    # epoch (0.607) is 2.9% above it.
    val = [0.70 - 0.0025 * i for i in range(36)] + [0.60, 0.59, 0.607, 0.593]
    train = [0.60 - 0.003 * i for i in range(40)]
    hist = curve(train=train, val=val)
    assert min(val) == 0.59 and verdict(hist, best_val_in_dataset=0.59) == "good fit"


def test_high_training_loss_is_underfitting():
    # Still improving, but it fits its own training data worse (0.66) than the best
    # model of the dataset fits unseen data (0.60).
    hist = curve(train=[0.70, 0.68, 0.66], val=[0.71, 0.69, 0.67])
    assert verdict(hist, best_val_in_dataset=0.60) == "underfitting"


def test_eval_mode_training_loss_decides_underfitting():
    # With dropout the logged training loss (0.66) sits above the best validation loss,
    # but in eval mode the model fits its training data better (0.55): not underfitting.
    hist = curve(train=[0.70, 0.68, 0.66], val=[0.64, 0.62, 0.60])
    assert verdict(hist, best_val_in_dataset=0.60) == "underfitting"
    assert verdict(hist, best_val_in_dataset=0.60, train_loss=0.55) == "good fit"


def test_a_run_far_worse_than_a_constant_predictor_is_diverged():
    hist = curve(train=[7e6, 3e5, 2.8e5], val=[7e6, 2.9e5, 2.76e5])
    assert verdict(hist, best_val_in_dataset=0.6, constant_val_loss=0.693) == "diverged"
    # Within twice a constant predictor's loss: the other rules decide.
    hist = curve(train=[0.9, 0.8, 0.75], val=[1.3, 1.2, 1.1])
    assert verdict(hist, best_val_in_dataset=0.6, constant_val_loss=0.693) == "underfitting"
    assert verdict(hist, best_val_in_dataset=0.6) == "underfitting"  # an older record


def test_constant_predictor_loss_is_the_label_entropy():
    from fitscope.model.metrics import constant_loss

    balanced = np.array([0, 1] * 50)
    assert constant_loss(balanced, balanced, 2) == pytest.approx(np.log(2))
    assert constant_loss(np.arange(10).repeat(5), np.arange(10), 10) == pytest.approx(np.log(10))


def test_val_rise_with_train_also_rising_is_not_overfitting():
    hist = curve(train=[0.7, 0.5, 0.6, 0.7], val=[0.7, 0.55, 0.65, 0.75])
    assert verdict(hist, best_val_in_dataset=0.55) == "good fit"


def _fake_run(root, name, seed, best_val, run_id=None, *, run_dir=None, width=16):
    d = run_dir or root / "runs" / name.split("-")[0] / name / str(seed)  # runs/<dataset>/<variant>
    d.mkdir(parents=True)
    (d / ".hydra").mkdir()
    (d / ".hydra" / "config.yaml").write_text(f"model:\n  width: {width}\n")
    hist = curve(train=[0.7, 0.5, 0.4], val=[0.7, best_val, best_val + 0.05])
    with open(d / "history.csv", "w", newline="") as fh:
        w = csv.DictWriter(
            fh,
            fieldnames=[
                "epoch",
                "train/loss",
                "val/loss",
                "train/acc",
                "val/acc",
                "train/auroc",
                "val/auroc",
            ],
        )
        w.writeheader()
        for h in hist:
            w.writerow(
                {**h, "train/acc": 0.7, "val/acc": 0.6, "train/auroc": 0.7, "val/auroc": 0.65}
            )
    (d / "calibration.csv").write_text(
        "bin_low,bin_high,confidence,accuracy,count\n0.2,0.2667,0.25,0.2,40\n0.6,0.6667,0.63,0.7,60\n"
    )
    (d / "roc.csv").write_text("fpr,tpr\n0.0,0.0\n0.3,0.7\n1.0,1.0\n")
    (d / "pr.csv").write_text("recall,precision\n1.0,0.5\n0.7,0.7\n0.0,1.0\n")
    (d / "metrics.json").write_text(
        json.dumps(
            {
                "n_params": 481,
                "best_val_loss": best_val,
                "best_val_acc": 0.6,
                "best_val_auroc": 0.65,
                "best_epoch": 1,
                "stopped_epoch": 2,
                "best_gap_loss": best_val - 0.5,
                "wall_time_s": 1.5,
                "test_loss": best_val + 0.01,
                "test_ece": 0.05,
                "last_epoch_test_loss": best_val + 0.03,
                "train_eval_loss": 0.5,
                "train_rows": 8984,
                **({"mlflow_run_id": run_id or f"run-{name}-{seed}"} if run_dir is None else {}),
            }
        )
    )


def _tracked_runs(names: list[str], seeds: int) -> tuple[str, dict[tuple[str, int], str]]:
    """A parent run and one finished child run per variant and seed in the MLflow store."""

    client = get_client()
    exp = ensure_experiment(client, "s1")
    parent = RunTracker.create(client, exp, "s1 · quick · abc", {}, {})
    ids = {}
    for name in names:
        for seed in range(seeds):
            tags = {PARENT_TAG: parent.run_id, "mlflow.source.git.commit": "abc1234"}
            child = RunTracker.create(client, exp, name, {}, tags)
            fit = {"fit/best_epoch": 1, "fit/stopped_epoch": 2, "fit/early_stopped": 1}
            child.log_summary({**fit, "best/val/loss": 0.6, "best/val/acc": 0.6}, step=1)
            child.log_summary({"test/loss": 0.61, "test/acc": 0.7}, step=1)
            child.finish()
            ids[name, seed] = child.run_id
    parent.finish()
    return parent.run_id, ids


def test_report_has_a_row_per_variant_with_mean_and_std(tmp_path, mlflow_uri):
    params = {
        "study": {"profile": "quick"},
        "variants": {
            "higgs": {
                "higgs-a": {"study": "s1", "overrides": ""},
                "higgs-b": {"study": "s1", "overrides": ""},
            }
        },
        "diagnostics": {
            "higgs": {"width": {"axis": "model.width", "variants": ["higgs-a"], "values": [4, 64]}}
        },
    }
    # The diagnostic's runs (stage diagnose): higgs-a at widths 4 and 64; its own is 16.
    for width, vals in {4: (0.68, 0.70), 64: (0.63, 0.64)}.items():
        for seed, v in enumerate(vals):
            run_dir = tmp_path / "runs" / "diagnostics" / f"higgs-a.width-{width}" / str(seed)
            _fake_run(tmp_path, "higgs-a", seed, v, run_dir=run_dir, width=width)
    parent_id, run_ids = _tracked_runs(["higgs-a", "higgs-b"], 2)
    tests = {}
    for name, vals in {"higgs-a": (0.60, 0.62), "higgs-b": (0.65, 0.65)}.items():
        for seed, v in enumerate(vals):
            _fake_run(tmp_path, name, seed, v, run_ids[name, seed])
        tests[name] = {
            "seeds": 2,
            "test_loss": 0.61,
            "test_loss_std": 0.01,
            "test_acc": 0.7,
            "test_acc_std": 0.02,
            "test_auroc": 0.75,
            "test_auroc_std": 0.0,
        }
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "higgs.json").write_text(json.dumps(tests))
    md = write_study_report(params, tmp_path / "runs", tmp_path / "metrics", tmp_path / "reports")
    text = md.read_text()
    assert "quick profile" in text
    assert "| higgs-a | 481 | 0.6100 ± 0.0141 |" in text
    assert "| higgs-b | 481 | 0.6500 ± 0.0000 |" in text
    assert f"{run_ids['higgs-a', 0]}, {run_ids['higgs-a', 1]}" in text
    # What early stopping bought: selected vs last epoch on test, and the patience replay
    # (3 epochs: no patience of 10 or more runs out before the history ends).
    # Seeds: per-seed verdict counts, the figures' bands, every seed's curve for dvc plots.
    assert "(2/2 seeds)" in text.split("| higgs-a |")[1].splitlines()[0]
    assert (tmp_path / "reports" / "curves" / "seeds" / "higgs-b" / "1.csv").is_file()
    # The validation curve over width: three points (4, 64 and higgs-a's own 16), a figure,
    # a sentence, and a file for dvc plots with every seed's values.
    curves = text.split("## Validation curves")[1].split("## Early stopping")[0]
    assert "### higgs_width" in curves and "![higgs_width](figures/higgs_width.png)" in curves
    assert "| higgs-a | 4 | 0.6900 ± 0.0141 | 0.5000 ± 0.0000 |" in curves
    assert "| higgs-a | 16 | 0.6100 ± 0.0141 |" in curves
    assert "- **higgs-a**: best at model.width = 16 (validation loss 0.6100)" in curves
    assert (tmp_path / "reports" / "figures" / "higgs_width.png").stat().st_size > 10_000
    with open(tmp_path / "reports" / "diagnostics" / "higgs_width" / "higgs-a.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["value"] for r in rows] == ["4", "16", "64"] and rows[2]["val_loss_seed1"] == "0.64"
    assert "Validation curves" in (tmp_path / "reports" / "study.html").read_text()
    early = text.split("## Early stopping")[1].split("## Learning curves")[0]
    assert "| higgs-a | 1 | 2 | 0.6200 | 0.6400 | 1 (0.6000, run ended first) |" in early
    assert "What early stopping bought" in early
    assert "Early stopping" in (tmp_path / "reports" / "study.html").read_text()
    # Calibration: ECE per variant, the reliability diagram with ROC and PR, dvc plots files.
    calibration = text.split("## Calibration")[1].split("## Learning curves")[0]
    assert "| higgs-a | 0.0500 ± 0.0000 |" in calibration and "reliability diagram" in calibration
    assert (tmp_path / "reports" / "roc" / "seeds" / "higgs-a" / "1.csv").is_file()
    assert (tmp_path / "reports" / "figures" / "calibration_higgs.png").stat().st_size > 10_000
    assert "![HIGGS](figures/calibration_higgs.png)" in calibration
    with open(tmp_path / "reports" / "calibration" / "higgs-a.csv") as fh:
        assert next(csv.reader(fh)) == ["bin_low", "bin_high", "confidence", "accuracy", "count"]
    assert (tmp_path / "reports" / "roc" / "higgs-b.csv").read_text().startswith("fpr,tpr")
    assert (tmp_path / "reports" / "figures" / "s1.png").stat().st_size > 10_000
    html = (tmp_path / "reports" / "study.html").read_text()
    assert "data:image/png;base64," in html and "higgs-b" in html
    with open(tmp_path / "reports" / "curves" / "higgs-a.csv") as fh:
        assert next(csv.reader(fh)) == ["epoch", "train_loss", "val_loss", "train_acc", "val_acc"]
    # The report's answers are on the MLflow runs: each run's study verdict and description,
    # the parent's report files and comparison table.

    client = get_client()
    for (name, _seed), run_id in run_ids.items():
        tags = client.get_run(run_id).data.tags
        assert tags["fitscope.verdict"] in text.split(f"| {name} |")[1].splitlines()[0]
        assert tags["mlflow.note.content"].startswith(f"**{name}** (quick profile): **")
        assert "Test: loss 0.6100, acc 0.7000." in tags["mlflow.note.content"]
    parent = client.get_run(parent_id)
    assert "| higgs-a | 481 | 0.6100 ± 0.0141 |" in parent.data.tags["mlflow.note.content"]
    files = {a.path for a in client.list_artifacts(parent_id, "report")}
    shown = ("study.md", "study.html", "comparison.csv", "s1.png", "calibration_higgs.png")
    assert files == {f"report/{f}" for f in shown}


def test_missing_metrics_is_a_clear_error(tmp_path):

    _fake_run(tmp_path, "higgs-a", 0, 0.6)
    params = {"variants": {"higgs": {"higgs-a": {"study": "s", "overrides": ""}}}}
    with pytest.raises(FitscopeError, match="evaluate stage"):
        write_study_report(params, tmp_path / "runs", tmp_path / "metrics", tmp_path / "r")
