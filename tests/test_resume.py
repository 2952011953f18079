"""Resume: a killed run continues its MLflow run from its last Lightning checkpoint and ends
exactly where an uninterrupted run ends (deterministic mode, debug size)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import run_train, runs_of

from fitscope.tracking.store import get_client

ARGS = [
    "model=large",
    "regularization=dropout",  # dropout draws from the RNG: its state must be resumed too
    "trainer.max_epochs=14",
    "callbacks.early_stopping.patience=4",
    "callbacks.checkpoint.every_epochs=1",
    "logger.flush_every=1",
    "logger.log_model=false",
]


def history(run_dir):
    with open(run_dir / "history.csv") as fh:
        return list(csv.DictReader(fh))


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["state_dict"]


def start_train(args: list[str], cwd, mlflow_uri: str) -> subprocess.Popen:
    """`python -m fitscope.train ARGS` in the background, in its own session."""
    return subprocess.Popen(
        [sys.executable, "-m", "fitscope.train", *args],
        cwd=cwd,
        env={**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def kill_after_first_checkpoint(args: list[str], cwd, mlflow_uri: str, study: str):
    """Start a run and SIGKILL it once its first checkpoint is written; the checkpoint."""
    proc = start_train(args, cwd, mlflow_uri)
    deadline = time.monotonic() + 300
    while not (found := list(cwd.glob(f"checkpoints/{study}/*/last.ckpt"))):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # a crash: nothing gets to clean up
    proc.wait()
    return found[0]


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(
    processed_dir, tmp_path, mlflow_uri
):
    common = [f"paths.data_dir={processed_dir}", *ARGS]
    base = run_train(
        [*common, "study=t_base", f"paths.run_dir={tmp_path / 'base'}"], tmp_path, mlflow_uri
    )
    assert base.returncode == 0, base.stderr

    args = [*common, "study=t_resume", f"paths.run_dir={tmp_path / 'resumed'}"]
    kill_after_first_checkpoint(args, tmp_path, mlflow_uri, "t_resume")

    again = run_train(args, tmp_path, mlflow_uri)
    assert again.returncode == 0, again.stderr
    output = again.stdout + again.stderr
    assert "resuming higgs-large-dropout from" in output
    assert "was left RUNNING: now KILLED" in output

    # The same result as the uninterrupted run: history, best epoch, restored weights.
    resumed_rows, base_rows = history(tmp_path / "resumed"), history(tmp_path / "base")
    assert resumed_rows == base_rows
    resumed_w, base_w = weights(tmp_path / "resumed"), weights(tmp_path / "base")
    assert all(torch.equal(resumed_w[k], base_w[k]) for k in base_w)

    # One MLflow run, continued: every epoch's metric exactly once, equal to the baseline's.
    client = get_client(mlflow_uri)
    _, runs = runs_of(client, "t_resume")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert "fitscope.resumed" in runs[0].data.tags
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val/loss")]
    assert sorted(steps) == list(range(len(base_rows)))
    _, base_runs = runs_of(client, "t_base")
    assert runs[0].data.metrics["best/val/loss"] == base_runs[0].data.metrics["best/val/loss"]
    assert runs[0].data.metrics["fit/best_epoch"] == base_runs[0].data.metrics["fit/best_epoch"]
    # The finished run's checkpoint is removed (callbacks.checkpoint.keep=false).
    assert not list(tmp_path.glob("checkpoints/t_resume/*/last.ckpt"))


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "random": lambda data: os.urandom(len(data)),
}


@pytest.mark.slow
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_an_unreadable_checkpoint_is_set_aside_and_the_run_trains_from_scratch(
    processed_dir, tmp_path, mlflow_uri, corruption
):
    args = [
        f"paths.data_dir={processed_dir}",
        *ARGS,
        "study=t_corrupt",
        f"paths.run_dir={tmp_path / 'run'}",
    ]
    ckpt = kill_after_first_checkpoint(args, tmp_path, mlflow_uri, "t_corrupt")
    ckpt.write_bytes(CORRUPTIONS[corruption](ckpt.read_bytes()))

    again = run_train(args, tmp_path, mlflow_uri)
    assert again.returncode == 0, again.stderr
    output = again.stdout + again.stderr
    assert "Traceback" not in output
    warned = [line for line in output.splitlines() if "cannot be resumed from" in line]
    shown = ckpt.relative_to(tmp_path)  # as the run names it: relative to its directory
    assert len(warned) == 1 and f"checkpoint {shown} cannot" in warned[0], output
    assert "weights_only=False" not in output  # torch's unsafe advice is not passed on
    aside = list(ckpt.parent.parent.glob(f"{ckpt.parent.name}.unreadable-*.ckpt"))
    assert len(aside) == 1 and f"Set aside as {aside[0].relative_to(tmp_path)};" in warned[0]
    assert "resuming" not in output
    assert history(tmp_path / "run")[0]["epoch"] == "0"  # trained from the first epoch

    # The record: the killed run stays KILLED, a new run finished the config.
    client = get_client(mlflow_uri)
    _, runs = runs_of(client, "t_corrupt")
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    finished = next(r for r in runs if r.info.status == "FINISHED")
    steps = [m.step for m in client.get_metric_history(finished.info.run_id, "val/loss")]
    assert sorted(steps) == list(range(len(history(tmp_path / "run"))))


@pytest.mark.slow
def test_metrics_reach_mlflow_by_time_so_a_kill_loses_little(processed_dir, tmp_path, mlflow_uri):
    # 1,000 epochs per batch would send nothing before the end; the 1 s bound sends anyway.
    args = [
        f"paths.data_dir={processed_dir}",
        "model=large",
        "trainer.max_epochs=200",
        "callbacks.early_stopping.enabled=false",
        "logger.flush_every=1000",
        "logger.flush_every_s=1",
        "logger.log_model=false",
        "study=t_flush",
        f"paths.run_dir={tmp_path / 'run'}",
    ]
    proc = start_train(args, tmp_path, mlflow_uri)
    client = get_client(mlflow_uri)
    deadline, logged = time.monotonic() + 120, []
    try:
        while len(logged) < 3:  # three epochs sent while the run still trains
            assert proc.poll() is None and time.monotonic() < deadline, "no metrics arrived"
            time.sleep(0.5)
            children = (
                runs_of(client, "t_flush")[1] if client.get_experiment_by_name("t_flush") else []
            )
            if children:
                run_id = children[0].info.run_id
                logged = client.get_metric_history(run_id, "val/loss")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert runs_of(client, "t_flush")[1][0].info.status == "RUNNING"  # killed mid-training
