"""Optuna sweeps through Hydra, tracked in MLflow, and the search report."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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
        "hydra/sweeper/pruner=median",  # the README's pruner: no trial pruned before the 6th
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=3",
        # Learning rates that learn in 3 epochs: the trials' values differ (the figures
        # of importance and contour model that variation).
        "optimizer.lr=tag(log, interval(1e-2, 3e-1))",
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
        assert 1e-2 <= lr <= 3e-1 and 1e-8 * 0.999 <= wd <= 1e-4 * 1.001
        assert len(client.get_metric_history(child.info.run_id, "val/acc")) == 3
    lrs = sorted(math.log10(float(c.data.params["optimizer.lr"])) for c in children)
    assert lrs[-1] - lrs[0] > 0.1  # sampled, not one value
    best = max(c.data.metrics["best/val/acc"] for c in children)
    assert parents[0].data.metrics["best/val/acc"] == pytest.approx(best)

    # The study is stored beside the search's outputs, with every epoch reported.
    study = stored_study(tmp_path, "mnist_search_random")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    assert all(len(t.intermediate_values) == 3 for t in study.trials)
    by_run = {t.user_attrs["mlflow_run_id"]: t for t in study.trials}
    for child in children:  # each trial's value is its run's objective
        trial = by_run[child.info.run_id]
        assert child.data.tags["fitscope.variant"] == f"trial-{trial.number}"
        assert trial.value == pytest.approx(child.data.metrics["best/val/acc"])

    # A restart of the same search continues the study, which is complete: nothing runs.
    again = search(args, tmp_path, mlflow_uri)
    assert again.returncode == 0, again.stderr
    assert "0 of 4 trials left" in again.stdout + again.stderr
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
    figures = ["optimization_history", "param_importances", "contour", "intermediate_values"]
    for name in figures:  # Optuna's own plots of the stored study
        assert (out / f"{name}.png").stat().st_size > 5000, name
        assert f"]({name}.png)" in md
    with open(out / "trials.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    logged = client.list_artifacts(parents[0].info.run_id, "search_report")
    assert {Path(a.path).name for a in logged} >= {f"{n}.png" for n in figures} | {"search.md"}


def stored_study(cwd: Path, name: str):
    """The search's study, from its journal beside the search's outputs."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = cwd / "multirun" / name / "optuna.journal"
    return optuna.load_study(
        study_name=name, storage=JournalStorage(JournalFileBackend(str(journal)))
    )


def test_an_interrupted_search_continues_its_study(processed_dir, tmp_path, mlflow_uri):
    """Ctrl-C during the second trial, then the same command: the study keeps its first
    trial, the interrupted trial continues under its name from its checkpoint, numbers
    continue, and the budget counts each trial once."""
    args = [
        "-m",
        "hparams_search=mnist_random",
        "hydra.sweeper.n_trials=3",
        "trainer.max_epochs=250",
        "callbacks.checkpoint.every_s=0.2",
        f"paths.data_dir={processed_dir}",
        "progress=false",
    ]
    log = tmp_path / "first.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fitscope.train", *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    while not (
        "trial-0: best epoch" in log.read_text()
        and list(tmp_path.glob("checkpoints/*/*/last.ckpt"))
    ):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(120) != 0, log.read_text()
    assert "interrupted at epoch" in log.read_text()
    study = stored_study(tmp_path, "mnist_search_random")
    first = {t.number: t.state.name for t in study.trials}
    # The interrupted trial is failed and its values enqueued (a WAITING trial) at once.
    assert first == {0: "COMPLETE", 1: "FAIL", 2: "WAITING"}, first
    assert "fitscope.interrupted" in study.trials[1].user_attrs

    again = run_train(args, tmp_path, mlflow_uri)
    assert again.returncode == 0, again.stderr
    output = again.stdout + again.stderr
    assert "2 of 3 trials left" in output and "resuming trial-1 from" in output, output
    study = stored_study(tmp_path, "mnist_search_random")
    states = [(t.number, t.state.name, t.user_attrs["fitscope.name"]) for t in study.trials]
    assert states == [
        (0, "COMPLETE", "trial-0"),
        (1, "FAIL", "trial-1"),
        (2, "COMPLETE", "trial-1"),  # the interrupted trial, continued with its values
        (3, "COMPLETE", "trial-3"),
    ], states
    assert study.trials[2].params == study.trials[1].params
    assert study.trials[3].params != study.trials[0].params  # the sampler never repeats
    client = get_client(mlflow_uri)
    parents, children = runs_of(client, "mnist_search_random")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    runs = {c.data.tags["fitscope.variant"]: c for c in children}
    assert sorted(runs) == ["trial-0", "trial-1", "trial-3"]
    assert {c.info.status for c in children} == {"FINISHED"}
    assert "fitscope.resumed" in runs["trial-1"].data.tags  # the KILLED run, continued
    assert study.trials[2].user_attrs["mlflow_run_id"] == runs["trial-1"].info.run_id


def test_two_processes_share_one_study_and_pruned_trials_are_recorded(
    processed_dir, tmp_path, mlflow_uri
):
    """The same search started twice at once: one study, each trial run once, by either
    process. A pruner that stops every trial after its second epoch: each trial is PRUNED
    in Optuna, FINISHED with the fitscope.pruned tag in MLflow, never the best trial."""
    args = [
        "-m",
        "hparams_search=mnist_tpe",
        "hydra.sweeper.n_trials=4",
        "trainer.max_epochs=30",
        "hydra/sweeper/pruner=threshold",
        "hydra.sweeper.pruner.lower=1.5",  # validation accuracy is always below it
        "hydra.sweeper.pruner.n_warmup_steps=1",
        f"paths.data_dir={processed_dir}",
        "progress=false",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fitscope.train", *args],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    study = stored_study(tmp_path, "mnist_search_tpe")
    assert sorted(t.number for t in study.trials) == list(range(4))
    assert {t.state.name for t in study.trials} == {"PRUNED"}
    assert {t.user_attrs["fitscope.pruned_at_epoch"] for t in study.trials} == {1}
    assert len({t.user_attrs["fitscope.owner"] for t in study.trials}) == 2  # both ran trials
    assert len({tuple(t.params.values()) for t in study.trials}) == 4  # no value drawn twice
    parents, children = runs_of(get_client(mlflow_uri), "mnist_search_tpe")
    assert len(parents) == 1 and len(children) == 4
    assert {c.info.status for c in children} == {"FINISHED"}
    assert all(c.data.tags["fitscope.pruned"].startswith("at epoch 1") for c in children)
    assert all(c.data.metrics["fit/stopped_epoch"] == 1 for c in children)
    assert parents[0].data.metrics["sweep/children_pruned"] == 4


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


def test_a_pruner_without_a_stored_study_is_refused_before_anything(
    processed_dir, tmp_path, mlflow_uri
):
    proc = search(
        [
            "hparams_search=mnist_random",
            "hydra/sweeper/pruner=median",
            "hydra.sweeper.storage=null",
            f"paths.data_dir={processed_dir}",
        ],
        tmp_path,
        mlflow_uri,
    )
    line = last_error_line(proc, 2)
    assert line == (
        "fitscope: error: a pruner needs the study stored where the trials can reach it. "
        "Fix: set hydra.sweeper.storage=auto (a journal file) or a database URL"
    )
    assert get_client(mlflow_uri).get_experiment_by_name("mnist_search_random") is None
    assert not (tmp_path / "multirun").exists()
