"""A tracking server that goes away loses nothing; eight jobs at once through one server.

Real processes, debug-size runs on the embedded HIGGS sample, against a plain
``mlflow server`` (SQLite) on a free loopback port that the tests SIGKILL by PID and start
again on the same port and store. Against the team stack (PostgreSQL, S3, MLflow with
basic auth) the same tests passed but took 6 minutes instead of 3 on 2 loaded cores (its
requests are slower: MLflow's basic auth verifies the password hash on every request
unless `auth_cache_ttl_seconds` is set); the same load against the stack is
`make bench BENCH_ARGS=--load` (docs/benchmarks.md).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from fitscope.core.errors import FitscopeError
from fitscope.model.mlp import ProbabilityModel, build_mlp_from_config, model_from_weights
from fitscope.tracking.store import ServerUnreachable, get_client
from fitscope.tracking.sync import sync_pending
from fitscope.tracking.tags import PARENT_TAG

EPOCH_KEYS_SKIP = ("epoch",)
CLEAN_ENV = ("FITSCOPE_PARENT_RUN_ID", "FITSCOPE_PENDING_DIR", "DVC_ROOT")


class Server:
    """A plain ``mlflow server`` on SQLite at 127.0.0.1:<free port>, started and killed by
    PID; its store and port stay, so a restart is the same server (to be the stack's
    MLflow at integration: fitscope.stack)."""

    def __init__(self, state: Path) -> None:
        self.state = state
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 90) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        mlflow = Path(sys.executable).with_name("mlflow")
        assert mlflow.is_file(), f"no {mlflow}. Fix: make install (installs mlflow)"
        cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--backend-store-uri", f"sqlite:///{self.state / 'mlflow.db'}", "--workers", "1"]
        cmd += ["--artifacts-destination", str(self.state / "artifacts")]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.state / "server.log", "a") as log:
            # Its own process group: the server and its workers are killed together.
            self.proc = subprocess.Popen(
                cmd, cwd=self.state, stdout=log, stderr=log, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.state / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.3)
        raise AssertionError(f"mlflow server on {self.uri} not ready in {timeout_s} s")

    def kill(self) -> None:
        """SIGKILL (a crash: nothing flushed), by the process group of the PID we started."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(timeout=30)
        self.proc = None

    def env(self) -> dict[str, str]:
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.uri}
        return {k: v for k, v in env.items() if k not in CLEAN_ENV}

    def client(self):
        return get_client(self.uri)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.kill()


def train_cmd(processed_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "fitscope.train",
        f"paths.data_dir={processed_dir}",
        f"paths.run_dir={run_dir}",
        "trainer=debug",
        "progress=false",
        "callbacks.early_stopping.enabled=false",
        *extra,
    ]


def sync(cwd: Path, server: Server) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "fitscope.cli", "runs", "sync"],
        cwd=cwd,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def history(run_dir: Path) -> dict[str, list[float]]:
    """history.csv as {key: [value per epoch]} (what the run trained, epoch by epoch)."""
    with open(run_dir / "history.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(float(r["epoch"])) for r in rows] == list(range(len(rows)))
    return {k: [float(r[k]) for r in rows] for k in rows[0] if k not in EPOCH_KEYS_SKIP}


def runs_of(client, study: str) -> list:
    exp = client.get_experiment_by_name(study)
    return client.search_runs([exp.experiment_id]) if exp else []


def assert_every_point(client, run_id: str, hist: dict[str, list[float]]) -> None:
    """Each epoch key on the server holds exactly the trained values, one per epoch."""
    for key, values in hist.items():
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        assert [m.step for m in points] == list(range(len(values))), key
        np.testing.assert_allclose([m.value for m in points], values, rtol=1e-6, err_msg=key)


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_a_run_with_the_server_down_trains_and_sync_uploads_it_once(
    processed_dir, tmp_path, server
):

    server.kill()  # down when the run starts
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        train_cmd(processed_dir, run_dir, "study=t_sync_down"),
        cwd=tmp_path,
        env=server.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    said = proc.stdout + proc.stderr  # Hydra sends the run's log lines to stdout
    assert "waits to be synced" in said and "fitscope runs sync" in said
    [record] = list((tmp_path / "mlruns-pending").iterdir())
    saved = tmp_path / "record-copy"
    shutil.copytree(record, saved)
    local = json.loads((run_dir / "metrics.json").read_text())
    assert local["mlflow_run_id"] is None and local["mlflow_sync_id"] == record.name
    hist = history(run_dir)

    server.start()
    out = sync(tmp_path, server)
    assert "synced 1 record(s)" in out and "model logged" in out, out
    assert not record.exists()
    client = server.client()
    [run] = runs_of(client, "t_sync_down")
    run_id = run.info.run_id
    assert run.info.status == "FINISHED"
    assert run.data.params["seed"] == "0" and run.data.params["model.width"] == str(
        json.loads((saved / "manifest.json").read_text())["config"]["model"]["width"]
    )
    assert run.data.tags["fitscope.variant"] == "higgs-tiny"
    assert run.data.tags["fitscope.sync_id"] == record.name
    assert "unreachable" in run.data.tags["fitscope.offline"]
    assert run.data.metrics["best/val/loss"] == pytest.approx(local["best_val_loss"])
    assert run.data.metrics["test/loss"] == pytest.approx(local["test_loss"])
    assert_every_point(client, run_id, hist)
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.csv", "learning_curves.png", "config", "metrics.json"} <= files
    # The logged model predicts what the locally saved weights predict.
    [model] = client.search_logged_models([run.info.experiment_id])
    import mlflow
    import torch

    mlflow.set_tracking_uri(server.uri)
    example = np.load(saved / "model" / "example.npy")
    served = mlflow.pyfunc.load_model(f"models:/{model.model_id}").predict(example)
    saved_pt = torch.load(run_dir / "model.pt", weights_only=True)
    mlp = build_mlp_from_config(saved_pt["config"], example.shape[1], init="torch_default")
    mlp.load_state_dict(saved_pt["state_dict"])
    with torch.no_grad():
        expected = ProbabilityModel(mlp.eval(), "binary")(torch.from_numpy(example)).numpy()
    np.testing.assert_allclose(np.asarray(served).reshape(expected.shape), expected, rtol=1e-5)

    # A sync cut short after uploading (the record still there): again, nothing doubles.
    shutil.copytree(saved, record)
    [again] = sync_pending(
        server.client(), tmp_path / "mlruns-pending", build_model=model_from_weights
    )
    assert again.done and again.run_id == run_id, again
    assert "0 param(s), 0 metric point(s)" in again.note and "model already there" in again.note
    [same] = runs_of(client, "t_sync_down")
    assert same.info.run_id == run_id and same.info.status == "FINISHED"
    assert len(client.search_logged_models([run.info.experiment_id])) == 1
    assert_every_point(client, run_id, hist)


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_a_sweep_started_with_the_server_down_is_nested_under_one_parent_at_sync(
    processed_dir, tmp_path, server
):
    """A DVC train stage is such a sweep (one job, ``tracking.parent_key``): neither may stop
    because the server is down; the sync makes the one parent and nests every job's run."""
    server.kill()
    seeds = ("0", "1")
    cmd = train_cmd(processed_dir, tmp_path / "unused", "study=t_sync_sweep")
    cmd.insert(cmd.index("fitscope.train") + 1, "-m")  # a multirun
    cmd += [f"seed={','.join(seeds)}", "tracking.parent_key=t-sweep"]
    cmd += [f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(
        cmd, cwd=tmp_path, env=server.env(), capture_output=True, text=True, timeout=300
    )
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-3000:]
    assert "unreachable" in said and "the sweep's runs wait to be synced" in said, said[-3000:]
    records = [json.loads(m.read_text()) for m in tmp_path.glob("mlruns-pending/*/manifest.json")]
    assert len(records) == len(seeds)
    assert {r["parent_key"] for r in records} == {records[0]["parent_key"]}
    assert records[0]["parent_key"].startswith("t-sweep")

    server.start()
    out = sync(tmp_path, server)
    assert f"synced {len(seeds)} record(s)" in out, out
    client = server.client()
    runs = runs_of(client, "t_sync_sweep")
    [parent] = [r for r in runs if r.data.tags.get("fitscope.role") == "parent"]
    children = [r for r in runs if r is not parent]
    assert sorted(r.data.params["seed"] for r in children) == sorted(seeds)
    assert {r.data.tags[PARENT_TAG] for r in children} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}, [r.info.status for r in runs]
    assert parent.data.tags["fitscope.parent_key"] == records[0]["parent_key"]
    assert "best/val/loss" in parent.data.metrics  # closed with its best child

    # Synced twice: nothing more on the server.
    assert "synced 0 record(s)" in sync(tmp_path, server)
    assert len(runs_of(client, "t_sync_sweep")) == len(runs)
    assert parent.data.metrics["sweep/children_finished"] == len(seeds)


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_a_server_killed_mid_run_loses_no_point(processed_dir, tmp_path, server):
    server.start()
    client = server.client()
    # A server that answers "not found" (a wrong path in the URI) is an error, not an outage.
    with pytest.raises(FitscopeError) as wrong:
        get_client(f"{server.uri}/no-such-prefix")
    assert not isinstance(wrong.value, ServerUnreachable) and "404" in str(wrong.value)
    run_dir, epochs = tmp_path / "run", 150
    args = ["study=t_sync_kill", f"trainer.max_epochs={epochs}", "logger.flush_every=1"]
    proc = subprocess.Popen(
        train_cmd(processed_dir, run_dir, *args, "logger.log_model=false"),
        cwd=tmp_path,
        env=server.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 180
    logged = 0
    while logged < 3:  # some epochs reached the server: then it crashes
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        runs = runs_of(client, "t_sync_kill")
        logged = len(client.get_metric_history(runs[0].info.run_id, "val/loss")) if runs else 0
        time.sleep(0.1)
    server.kill()  # SIGKILL, mid-run
    said = "".join(proc.communicate(timeout=300))
    assert proc.returncode == 0, said
    assert "unreachable" in said and "waits to be synced" in said
    hist = history(run_dir)
    assert len(hist["val/loss"]) == epochs

    server.start()  # the same port and store
    [run] = runs_of(client, "t_sync_kill")
    on_server = len(client.get_metric_history(run.info.run_id, "val/loss"))
    assert on_server < epochs and run.info.status == "RUNNING"  # the crash cut it short
    out = sync(tmp_path, server)
    assert "synced 1 record(s)" in out, out
    [run] = runs_of(client, "t_sync_kill")  # the same run, no second one
    assert run.info.status == "FINISHED" and "fitscope.failure" not in run.data.tags
    assert_every_point(client, run.info.run_id, hist)
    assert (
        sync_pending(server.client(), tmp_path / "mlruns-pending", build_model=model_from_weights)
        == []
    )
    assert len(runs_of(client, "t_sync_kill")) == 1


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_eight_jobs_at_once_lose_no_point_and_train_one_config_once(
    processed_dir, tmp_path, server
):
    """Seven configs and a twin of one, all started together, every epoch sent at once."""
    server.start()
    epochs, seeds = 5, [0, 1, 2, 3, 4, 5, 6, 0]
    procs = [
        subprocess.Popen(
            train_cmd(
                processed_dir,
                tmp_path / f"run{i}",
                "study=t_load",
                f"seed={seed}",
                f"trainer.max_epochs={epochs}",
                "logger.flush_every=1",
                "logger.log_model=false",
            ),
            cwd=tmp_path,
            env=server.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, seed in enumerate(seeds)
    ]
    outs = ["".join(p.communicate(timeout=400)) for p in procs]
    failed = [f"job {i}: {outs[i][-3000:]}" for i, p in enumerate(procs) if p.returncode != 0]
    assert not failed, "\n".join(failed)
    # The twin either sees the claim of the first (running) or its FINISHED run.
    assert sum("skipping higgs-tiny" in o for o in outs) == 1, outs
    client = server.client()
    runs = runs_of(client, "t_load")
    assert len(runs) == 7 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["fitscope.config_hash"] for r in runs}) == 7
    trained = [i for i, o in enumerate(outs) if "skipping" not in o]
    keys = history(tmp_path / f"run{trained[0]}").keys()
    for run in runs:
        for key in keys:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(epochs)), (run.info.run_id, key)
    assert not (tmp_path / "mlruns-pending").exists() or not any(
        (tmp_path / "mlruns-pending").iterdir()
    )
