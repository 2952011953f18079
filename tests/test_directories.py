"""Every directory a run writes is checked before any work, and a sweep directory is held
by one live sweep at a time (docs/reliability.md)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import last_error_line, run_train

from fitscope.core.dirlock import HOLD_FILE
from fitscope.core.process import Owner

pytestmark = pytest.mark.slow  # training processes

DEBUG = ["trainer=debug", "progress=false"]

UNDER_A_FILE = {
    "hydra.run.dir": [],
    "hydra.sweep.dir": ["-m"],
    "callbacks.checkpoint.dir": [],
}


@pytest.mark.parametrize("key", sorted(UNDER_A_FILE))
def test_a_directory_under_a_file_is_refused_before_any_work(
    key, processed_dir, tmp_path, mlflow_uri
):
    (tmp_path / "a_file").write_text("not a directory")
    args = [*UNDER_A_FILE[key], f"paths.data_dir={processed_dir}", *DEBUG, f"{key}=a_file/x"]
    proc = run_train(args, tmp_path, mlflow_uri)
    line = last_error_line(proc, 2)
    assert line == (
        f"fitscope: error: cannot write to {key}=a_file/x (a_file is not a directory). "
        f"Fix: make it writable or set {key} to a writable directory"
    )
    assert not (tmp_path / "mlflow.db").exists()  # no store, no run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_read_only_outputs_directory_is_refused_before_any_work(
    processed_dir, tmp_path, mlflow_uri
):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    # Immutable: read-only even for root, which these tests may run as.
    subprocess.run(["chattr", "+i", str(outputs)], check=True)
    try:
        proc = run_train([f"paths.data_dir={processed_dir}", *DEBUG], tmp_path, mlflow_uri)
    finally:
        subprocess.run(["chattr", "-i", str(outputs)], check=True)
    line = last_error_line(proc, 2)
    assert line.startswith("fitscope: error: cannot write to hydra.run.dir=outputs/adhoc/")
    assert line.endswith("Fix: make it writable or set hydra.run.dir to a writable directory")
    assert not (tmp_path / "mlflow.db").exists()


def test_a_sweep_directory_held_by_a_live_sweep_is_refused(processed_dir, tmp_path, mlflow_uri):
    common = ["-m", f"paths.data_dir={processed_dir}", "hydra.sweep.dir=shared", "progress=false"]
    long_job = [
        "model=large",
        "trainer.max_epochs=40",
        "callbacks.early_stopping.enabled=false",
        "logger.log_model=false",
    ]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    first = subprocess.Popen(
        [sys.executable, "-m", "fitscope.train", *common, *long_job],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    hold = tmp_path / "shared" / HOLD_FILE
    deadline = time.monotonic() + 120
    while not hold.is_file():
        assert first.poll() is None and time.monotonic() < deadline, "the sweep never held it"
        time.sleep(0.1)

    second = run_train([*common, *DEBUG], tmp_path, mlflow_uri)
    line = last_error_line(second, 2)
    assert line == (
        f"fitscope: error: hydra.sweep.dir=shared is in use by the sweep in pid {first.pid} on "
        f"host {socket.gethostname()}. Fix: wait for it to end, or set another hydra.sweep.dir"
    )
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr  # the first sweep is untouched
    assert not (tmp_path / "shared" / "failed_jobs.tsv").exists()
    assert not hold.exists()  # given up when the sweep ended

    # A hold left by a process that is gone (kill -9) is taken over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    hold.write_text(Owner(socket.gethostname(), dead.pid, time.time()).token())
    third = run_train([*common, *DEBUG], tmp_path, mlflow_uri)
    assert third.returncode == 0, third.stderr
    assert not hold.exists()
