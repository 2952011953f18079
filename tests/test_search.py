"""Optuna sweeps through Hydra, tracked in MLflow, and the search report."""

from __future__ import annotations

import csv
import math
import subprocess
import sys

import pytest
from conftest import last_error_line, run_train, runs_of

from fitscope.tracking.store import get_client
from fitscope.tracking.tags import PARENT_TAG

pytestmark = pytest.mark.slow


def search(args, cwd, uri):
    return run_train(["-m", *args], cwd, uri)


def test_four_trial_search_is_tracked_reported_and_resumable(processed_dir, tmp_path, mlflow_uri):
    args = [
        "hparams_search=mnist_random",
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=3",
        f"paths.data_dir={processed_dir}",
    ]
    first = search(args, tmp_path, mlflow_uri)
    assert first.returncode == 0, first.stderr
    assert (
        "sweep mnist_search_random: 4/4 jobs done" in first.stderr
    )  # a search counts against its trial budget
    client = get_client(mlflow_uri)
    parents, children = runs_of(client, "mnist_search_random")
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].info.status == "FINISHED"
    for child in children:
        assert child.data.tags[PARENT_TAG] == parents[0].info.run_id
        lr = float(child.data.params["optimizer.lr"])
        wd = 2 * float(child.data.params["regularization.l2"])
        assert 1e-6 <= lr <= 1e-2 and 1e-8 * 0.999 <= wd <= 1e-4 * 1.001
        assert len(client.get_metric_history(child.info.run_id, "val/acc")) == 3
    lrs = sorted(math.log10(float(c.data.params["optimizer.lr"])) for c in children)
    assert lrs[-1] - lrs[0] > 0.1  # sampled, not one value
    best = max(c.data.metrics["best/val/acc"] for c in children)
    assert parents[0].data.metrics["best/val/acc"] == pytest.approx(best)

    # A restart of the same search (same name and seed) re-runs nothing.
    again = search(args, tmp_path, mlflow_uri)
    assert again.returncode == 0, again.stderr
    assert (again.stdout + again.stderr).count("already finished with this config") == 4
    parents_again, children_again = runs_of(client, "mnist_search_random")
    assert len(parents_again) == 1 and len(children_again) == 4

    report = subprocess.run(  # MLFLOW_TRACKING_URI is set by the mlflow_uri fixture
        [sys.executable, "-m", "fitscope.report.search", "mnist_search_random"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert report.returncode == 0, report.stderr
    out = tmp_path / "reports" / "search" / "mnist_search_random"
    md = (out / "search.md").read_text()
    assert md.count("| `") == 4  # four rows in the top-trials table
    assert (out / "top_trials.png").stat().st_size > 5000
    assert (out / "lr_wd_scatter.png").stat().st_size > 5000
    with open(out / "trials.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4


def test_search_whose_trials_all_fail_ends_cleanly(processed_dir, tmp_path, mlflow_uri):
    proc = search(
        [
            "hparams_search=mnist_random",
            "hydra.sweeper.n_trials=3",
            "trainer.max_epochs=2",
            f"paths.data_dir={processed_dir}",
            "study=t_fail",
            "optimizer.lr=tag(log, interval(1e6, 1e8))",
        ],
        tmp_path,
        mlflow_uri,
    )
    assert last_error_line(proc, 1).startswith("fitscope: error: every job of the sweep failed")
    parents, children = runs_of(get_client(mlflow_uri), "t_fail")
    assert len(children) == 3
    assert {c.info.status for c in children} == {"FAILED"}
    assert all("loss became nan" in c.data.tags["fitscope.failure"] for c in children)
    assert parents[0].info.status == "FAILED"
