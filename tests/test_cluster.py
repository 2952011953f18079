"""Sweeps on a cluster without the team stack: submitit, the SLURM preset, a Ray head that
does not answer. The Ray sweeps on the stack's Ray head are in test_stack.py (one stack per
`make test`)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from conftest import job_metrics, last_error_line, nested_finished_children, sweep

from fitscope.tracking.liveness import run_owner
from fitscope.tracking.store import get_client

pytestmark = pytest.mark.slow

DEBUG = ["+profile=debug", "progress=false"]  # 3 epochs of the tiny model


def test_submitit_local_sweep_logs_nested_runs(mlflow_uri, processed_dir, tmp_path):
    # A store of its own (SQLite): the jobs find it, and the parent run, in the environment
    # they inherit from the sweep, as SLURM jobs do.
    data = f"paths.data_dir={processed_dir}"
    args = ["hydra/launcher=submitit_local", "study=t_submitit", "seed=0,1", data, *DEBUG]
    proc = sweep(args, tmp_path)
    assert proc.returncode == 0, proc.stderr
    children = nested_finished_children(get_client(mlflow_uri), "t_submitit", 2)
    # Each job ran in a process of its own, not in the sweep's.
    assert len({run_owner(c).pid for c in children}) == 2
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
    assert get_client(mlflow_uri).get_experiment_by_name("t_noray") is None
