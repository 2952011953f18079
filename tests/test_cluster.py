"""Sweeps on a cluster: the Ray launcher on the team stack's Ray head, submitit, SLURM preset.

The jobs log to the stack's MLflow server (PostgreSQL + S3, basic auth); the sweep's driver
runs in ``tmp_path`` while the Ray head (and so each worker) started elsewhere.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import last_error_line, runs_of

from fitscope import tracking

pytestmark = pytest.mark.slow

DEBUG = ["+profile=debug", "progress=false"]  # 3 epochs of the tiny model


@pytest.fixture
def stack_env(team_stack, monkeypatch) -> dict[str, str]:
    """The stack's client variables (stack.env), for the sweep and this test's client."""
    env = team_stack.client_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    return env


def sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m fitscope.train -m ARGS` in ``cwd`` with this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "fitscope.train", "-m", *args],
        cwd=cwd,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_metrics(sweep_root: Path) -> dict[int, dict]:
    """metrics.json of each job of the one sweep under ``sweep_root``, by seed."""
    files = list(sweep_root.glob("*/*/metrics.json"))
    return {(m := json.loads(f.read_text()))["seed"]: m for f in files}


def nested_finished_children(client, study: str, jobs: int) -> list:
    """The study's child runs, after checking: one FINISHED parent, ``jobs`` FINISHED children
    tagged with it."""
    parents, children = runs_of(client, study)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == jobs
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags[tracking.PARENT_TAG] == parents[0].info.run_id
    return children


def test_ray_sweep_logs_nested_runs_and_models_and_matches_a_local_run(
    stack_env, processed_dir, tmp_path
):
    data = f"paths.data_dir={processed_dir}"
    proc = sweep(["hydra/launcher=ray", "study=t_ray", "seed=0,1,2,3", data, *DEBUG], tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Each job ran in a Ray worker (Ray prefixes its lines with the worker's pid).
    out = proc.stdout + proc.stderr
    worker_pids = {int(p) for p in re.findall(r"\(_run_job pid=(\d+)", out)}
    assert worker_pids

    client = tracking.get_client(stack_env["MLFLOW_TRACKING_URI"])
    children = nested_finished_children(client, "t_ray", 4)
    assert {tracking.run_owner(c).pid for c in children} <= worker_pids
    assert len({c.data.params["seed"] for c in children}) == 4
    # Each job's model is in the server's artifact store (S3), logged from its run.
    exp_id = client.get_experiment_by_name("t_ray").experiment_id
    models = client.search_logged_models(experiment_ids=[exp_id])
    assert {m.source_run_id for m in models} == {c.info.run_id for c in children}
    # Outputs land under the driver's directory, as with a local sweep.
    on_ray = job_metrics(tmp_path / "multirun" / "t_ray")
    assert sorted(on_ray) == [0, 1, 2, 3]

    # The same two jobs on the basic (in-process) launcher give the same results.
    proc = sweep(["study=t_local", "seed=0,1", "logger=none", data, *DEBUG], tmp_path)
    assert proc.returncode == 0, proc.stderr
    local = job_metrics(tmp_path / "multirun" / "t_local")
    assert sorted(local) == [0, 1]
    for seed in (0, 1):
        keys = [k for k in local[seed] if k.startswith(("best_val_", "test_"))]
        assert "best_val_loss" in keys and "test_auroc" in keys
        assert {k: on_ray[seed][k] for k in keys} == {k: local[seed][k] for k in keys}


def test_optuna_search_runs_through_ray(stack_env, processed_dir, tmp_path):
    proc = sweep(
        [
            "hydra/launcher=ray",
            "hparams_search=mnist_random",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.n_jobs=2",  # one batch of two trials, side by side on the cluster
            "trainer.max_epochs=2",
            "study=t_ray_search",
            f"paths.data_dir={processed_dir}",
            "progress=false",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(set(re.findall(r"\(_run_job pid=(\d+)", proc.stdout + proc.stderr))) >= 1
    client = tracking.get_client(stack_env["MLFLOW_TRACKING_URI"])
    children = nested_finished_children(client, "t_ray_search", 2)
    assert len({c.data.params["optimizer.lr"] for c in children}) == 2
    parents, _ = runs_of(client, "t_ray_search")
    best = max(c.data.metrics["best/val/acc"] for c in children)
    assert parents[0].data.metrics["best/val/acc"] == pytest.approx(best)


def test_submitit_local_sweep_logs_nested_runs(mlflow_uri, processed_dir, tmp_path):
    # A store of its own (SQLite): the jobs find it, and the parent run, in the environment
    # they inherit from the sweep, as SLURM jobs do.
    data = f"paths.data_dir={processed_dir}"
    args = ["hydra/launcher=submitit_local", "study=t_submitit", "seed=0,1", data, *DEBUG]
    proc = sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    children = nested_finished_children(tracking.get_client(mlflow_uri), "t_submitit", 2)
    # Each job ran in a process of its own, not in the sweep's.
    assert len({tracking.run_owner(c).pid for c in children}) == 2
    assert sorted(job_metrics(tmp_path / "multirun" / "t_submitit")) == [0, 1]


def test_slurm_preset_composes_for_a_site(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fitscope.train",
            "hydra/launcher=slurm",
            "hydra.launcher.partition=cpu",
            "--cfg",
            "hydra",
            "--package",
            "hydra.launcher",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "partition: cpu" in proc.stdout
    assert "export: ALL" in proc.stdout
    assert "cpus_per_task: 1" in proc.stdout


def test_unreachable_ray_head_is_one_line_before_any_run(mlflow_uri, processed_dir, tmp_path):
    with socket.socket() as sock:  # a loopback port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address=127.0.0.1:{port}"]
    proc = sweep([*args, "study=t_noray", "seed=0,1", f"paths.data_dir={processed_dir}"], tmp_path)
    line = last_error_line(proc, 2)
    assert line.startswith(f"fitscope: error: no Ray head answers at 127.0.0.1:{port}. Fix:")
    assert tracking.get_client(mlflow_uri).get_experiment_by_name("t_noray") is None
