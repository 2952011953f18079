"""The team stack (fitscope.stack): real PostgreSQL, SeaweedFS S3, MLflow server, Ray head.

Everything that needs the stack is in this file, so `make test` starts it once: the
checks of each component, `dvc repro`/push/pull against it, and sweeps on its Ray head
(the jobs log to its MLflow server; the sweep's driver runs in ``tmp_path`` while the Ray
head, and so each worker, started elsewhere).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode

import pytest
from conftest import job_metrics, make_repo_copy, nested_finished_children, run, runs_of, sweep

from fitscope.pipeline.diagnostics import drop_diagnostics
from fitscope.search.storage import STACK_STORAGE_ENV, describe
from fitscope.stack.control import (
    configure_dvc_remote,
    stack_status,
    start_stack,
    stop_stack,
    write_env_file,
)
from fitscope.stack.info import ADMIN_USER, BUCKET, COMPONENTS, HOST, RAY_ADDRESS_ENV, StackInfo
from fitscope.stack.processes import free_ports
from fitscope.tracking.liveness import run_owner
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import PARENT_ENV

pytestmark = pytest.mark.slow


def _search_experiments(info: StackInfo, password: str | None) -> int:
    """HTTP status of a REST call, with the admin's credentials or none."""
    req = urllib.request.Request(
        f"{info.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    )
    if password is not None:
        token = b64encode(f"{ADMIN_USER}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_server_refuses_anonymous_and_accepts_the_admin(team_stack):
    assert _search_experiments(team_stack, None) == 401
    assert _search_experiments(team_stack, "wrong-password") == 401
    assert _search_experiments(team_stack, team_stack.credentials["admin_password"]) == 200


def test_s3_refuses_unknown_keys(team_stack):
    import boto3
    from botocore.exceptions import ClientError

    stranger = boto3.client(
        "s3",
        endpoint_url=team_stack.s3_endpoint,
        aws_access_key_id="nobody",
        aws_secret_access_key="nothing",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError):
        stranger.list_objects_v2(Bucket=BUCKET)
    assert team_stack.s3_client().head_bucket(Bucket=BUCKET)


def test_env_file_is_private_and_sources(team_stack, tmp_path):
    env_file = write_env_file(team_stack, tmp_path / "stack.env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    shown = subprocess.run(
        ["bash", "-c", f"source {env_file} && env"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert env["MLFLOW_TRACKING_URI"] == team_stack.tracking_uri
    assert env["MLFLOW_TRACKING_PASSWORD"] == team_stack.credentials["admin_password"]
    assert env[RAY_ADDRESS_ENV] == team_stack.ray_address


def test_ray_head_runs_a_task_for_a_client_with_the_stack_env(team_stack):
    code = (
        "import os, ray; ray.init(address=os.environ['FITSCOPE_RAY_ADDRESS'], "
        "log_to_driver=False); print('sum', ray.get(ray.remote(lambda: 1 + 1).remote()))"
    )
    env = {**os.environ, **team_stack.client_env()}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "sum 2" in proc.stdout, proc.stderr[-2000:]


def test_every_listening_socket_is_loopback(team_stack):
    import psutil

    pids = set()
    for pid in team_stack.pids.values():
        proc = psutil.Process(pid)
        pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids]
    assert {team_stack.ports[k] for k in ("postgres", "s3", "mlflow", "ray")} <= {
        c.laddr.port for c in listening
    }
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening


def stack_up(state_dir, *args: str) -> subprocess.CompletedProcess:
    """`fitscope stack up --state-dir STATE_DIR ARGS` (what `make stack` runs)."""
    return subprocess.run(
        [sys.executable, "-m", "fitscope.cli", "stack", "up", "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_port_in_use_is_one_line_error_naming_the_component_and_its_log(tmp_path):
    import socket

    import psutil

    ports = free_ports()
    with socket.socket() as busy:
        busy.bind((HOST, ports["postgres"]))
        busy.listen()
        proc = stack_up(
            tmp_path,
            *("--components", "postgres", "--no-dvc-remote"),
            *("--env-file", str(tmp_path / "stack.env")),
            *("--port", f"postgres={ports['postgres']}"),
        )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "stack component postgres exited" in line and str(tmp_path / "postgres.log") in line
    assert "could not" in (tmp_path / "postgres.log").read_text()  # PostgreSQL's own words
    assert not (tmp_path / "postgres.pid").exists()  # nothing left to stop
    assert not [
        p
        for p in psutil.process_iter(["cmdline"])
        if str(tmp_path / "pgdata") in " ".join(p.info["cmdline"] or [])
    ]


def test_unknown_component_is_one_line_error(tmp_path):
    proc = stack_up(tmp_path, "--components", "mlflow")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "mlflow needs postgres, s3" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "state.json").exists()  # refused before anything started


# -- "works unchanged" against the stack, and the DVC remote ---------------------------------

VARIANT = "higgs-tiny"  # the one variant of the study below: stage train@higgs
STAGE = "train@higgs"


def _debug_study(repo) -> None:
    """params.yaml of a one-variant debug study (the same edit in every clone)."""
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    params["study"]["profile"] = "debug"
    params["variants"] = {"higgs": {VARIANT: params["variants"]["higgs"][VARIANT]}}
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    drop_diagnostics(repo)  # they train variants this copy no longer has


def _clone(team_stack, dest):
    """A teammate's fresh clone: the same commit and params, the DVC remote configured."""
    repo = make_repo_copy(dest)
    _debug_study(repo)
    configure_dvc_remote(team_stack, repo)
    return repo


@pytest.fixture(scope="module")
def team_repo(team_stack, tmp_path_factory):
    """`source stack.env && dvc repro && dvc push --run-cache` on a fresh clone."""
    repo = _clone(team_stack, tmp_path_factory.mktemp("team") / "repo")
    # `report` and what it needs (the MNIST data stages are not needed here).
    out = run(["dvc", "repro", "report"], repo, env=team_stack.client_env()).stdout
    assert f"Running stage '{STAGE}'" in out and "Running stage 'report'" in out
    run(["dvc", "push", "--run-cache"], repo)
    return repo


@pytest.fixture
def stack_env(team_stack, monkeypatch) -> dict[str, str]:
    """The stack's client variables (what `source stack.env` exports), in this process."""
    env = team_stack.client_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv(PARENT_ENV, raising=False)
    return env


@pytest.fixture
def server(stack_env):
    """An MlflowClient on the stack's server, with the credentials stack.env exports."""
    return get_client()


def _trained(repo) -> dict:
    return json.loads((repo / "runs" / "higgs" / VARIANT / "0" / "metrics.json").read_text())


def test_pipeline_logs_run_model_and_alias_to_the_server(
    team_stack, team_repo, server, monkeypatch
):
    import mlflow
    import numpy as np

    trained = _trained(team_repo)
    tracked = server.get_run(trained["mlflow_run_id"])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["model.name"] and tracked.data.tags["fitscope.variant"] == VARIANT
    epochs = [m.step for m in server.get_metric_history(tracked.info.run_id, "val/loss")]
    assert epochs == list(range(len(epochs))) and len(epochs) >= 2
    assert tracked.data.metrics["best/val/loss"] == pytest.approx(trained["best_val_loss"])
    # The model's files are in the S3 bucket (the server proxies them), not on local disk.
    model_id = trained["mlflow_model_uri"].removeprefix("models:/")
    keys = [
        o["Key"]
        for o in team_stack.s3_client().list_objects_v2(Bucket=BUCKET)["Contents"]
        if model_id in o["Key"]
    ]
    assert any(k.endswith("MLmodel") for k in keys), keys
    assert not (team_repo / "mlartifacts").exists() and not (team_repo / "mlflow.db").exists()
    version = server.get_model_version_by_alias("fitscope-higgs", "debug")
    assert version.run_id == tracked.info.run_id
    # The report stage read the run back from the server: its commit is on the version.
    assert version.tags["fitscope.commit"] == tracked.data.tags["mlflow.source.git.commit"]
    report = (team_repo / "reports" / "study.md").read_text()
    assert tracked.info.run_id in report and f"open {team_stack.tracking_uri}" in report
    # The server fixture's environment decides (no global URI left to later tests).
    monkeypatch.setattr("mlflow.tracking._tracking_service.utils._tracking_uri", None)
    monkeypatch.setattr("mlflow.tracking._model_registry.utils._registry_uri", None)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)  # the registry is the server's
    model = mlflow.pyfunc.load_model("models:/fitscope-higgs@debug")
    x = np.load(team_repo / "data/processed/higgs/test_x.npy")[:4]
    assert np.asarray(model.predict(x)).shape == (4, 1)


def _digests(repo, *paths: str) -> dict[str, str]:
    import hashlib

    found = {}
    for top in paths:
        for f in sorted((repo / top).rglob("*")):
            if f.is_file():
                found[str(f.relative_to(repo))] = hashlib.md5(f.read_bytes()).hexdigest()
    return found


OUTPUTS = ("data/raw/higgs", "data/processed/higgs", "runs/higgs")


def test_dvc_push_then_pull_on_another_clone_restores_data_splits_and_model(
    team_stack, team_repo, tmp_path
):
    clone = _clone(team_stack, tmp_path / "clone")
    (clone / "dvc.lock").write_text((team_repo / "dvc.lock").read_text())
    run(["dvc", "pull", "fetch_higgs", "split_higgs", STAGE], clone)
    want = _digests(team_repo, *OUTPUTS)
    assert any(k.endswith(".npy") for k in want) and any("model" in k for k in want), want
    assert _digests(clone, *OUTPUTS) == want


def test_fresh_clone_gets_the_trained_stage_from_the_run_cache(
    team_stack, team_repo, server, tmp_path
):
    runs_before = server.search_runs(
        [e.experiment_id for e in server.search_experiments()], max_results=1000
    )
    clone = _clone(team_stack, tmp_path / "fresh")
    assert STAGE not in (clone / "dvc.lock").read_text()  # nothing trained here
    # --pull: the run cache and the outputs its entries name (`dvc pull --run-cache` alone
    # fails on the stages this clone's dvc.lock does not record, docs/team.md).
    cmd = ["dvc", "repro", "--pull", STAGE]
    out = run(cmd, clone, env=team_stack.client_env()).stdout
    assert f"Stage '{STAGE}' is cached - skipping run, checking out outputs" in out
    assert f"Running stage '{STAGE}'" not in out
    assert _digests(clone, "runs/higgs") == _digests(team_repo, "runs/higgs")
    runs_after = server.search_runs(
        [e.experiment_id for e in server.search_experiments()], max_results=1000
    )
    assert len(runs_after) == len(runs_before)  # no new MLflow run: nothing retrained


# -- sweeps on the stack's Ray head, logging to its server -------------------------------------

RAY_DEBUG = ["+profile=debug", "progress=false"]  # 3 epochs of the tiny model


def test_ray_sweep_logs_nested_runs_and_models_and_matches_a_local_run(
    stack_env, processed_dir, tmp_path
):
    data = f"paths.data_dir={processed_dir}"
    proc = sweep(["hydra/launcher=ray", "study=t_ray", "seed=0,1,2,3", data, *RAY_DEBUG], tmp_path)
    assert proc.returncode == 0, proc.stderr
    # Each job ran in a Ray worker (Ray prefixes its lines with the worker's pid).
    out = proc.stdout + proc.stderr
    worker_pids = {int(p) for p in re.findall(r"\(_run_job pid=(\d+)", out)}
    assert worker_pids

    client = get_client(stack_env["MLFLOW_TRACKING_URI"])
    children = nested_finished_children(client, "t_ray", 4)
    (parent,) = runs_of(client, "t_ray")[0]
    owners = {run_owner(c).pid for c in children}
    # Not in the sweep's own process (it owns the parent), but in Ray's workers. Ray's log
    # forwarding can drop a worker's last lines under load: the prefixes name at least one.
    assert run_owner(parent).pid not in owners
    assert owners & worker_pids
    assert len({c.data.params["seed"] for c in children}) == 4
    # Each job's model is in the server's artifact store (S3), logged from its run.
    exp_id = client.get_experiment_by_name("t_ray").experiment_id
    models = client.search_logged_models(experiment_ids=[exp_id])
    assert {m.source_run_id for m in models} == {c.info.run_id for c in children}
    # Outputs land under the driver's directory, as with a local sweep.
    on_ray = job_metrics(tmp_path / "multirun" / "t_ray")
    assert sorted(on_ray) == [0, 1, 2, 3]

    # The same two jobs on the basic (in-process) launcher give the same results.
    proc = sweep(["study=t_local", "seed=0,1", "logger=none", data, *RAY_DEBUG], tmp_path)
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
    client = get_client(stack_env["MLFLOW_TRACKING_URI"])
    children = nested_finished_children(client, "t_ray_search", 2)
    assert len({c.data.params["optimizer.lr"] for c in children}) == 2
    parents, _ = runs_of(client, "t_ray_search")
    best = max(c.data.metrics["best/val/acc"] for c in children)
    assert parents[0].data.metrics["best/val/acc"] == pytest.approx(best)
    # The study is in the stack's PostgreSQL (its `optuna` database), its password kept
    # out of the record; the Ray workers reported every epoch to it.
    import optuna

    storage = stack_env[STACK_STORAGE_ENV]
    assert parents[0].data.tags["optuna.storage"] == describe(storage) != storage
    study = optuna.load_study(study_name="t_ray_search", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert all(len(t.intermediate_values) == 2 for t in study.trials)
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {
        c.info.run_id for c in children
    }


def test_the_benchs_load_measures_the_stack_without_losing_a_point(team_stack, stack_env):
    """`make bench`'s load figures against this stack (the bench starts one of its own;
    its smoke, tests/test_bench.py, measures a local store to stay short)."""
    from fitscope.bench.load import load_figures

    figures = load_figures(jobs=2, epochs=3, stack=team_stack, warmup_s=3)
    assert figures["load_points_lost"] == 0 and figures["load_points_per_s"] > 0
    assert figures["load_server"].startswith("team stack")
    assert 0 < figures["load_stack_rss_idle_mb"] <= figures["load_stack_rss_peak_mb"]


def test_stop_by_pid_then_start_keeps_runs_models_and_credentials(team_stack, team_repo):
    """Last in this file: it restarts the module's stack in place."""
    import psutil

    procs = []
    for pid in team_stack.pids.values():
        proc = psutil.Process(pid)
        procs += [proc, *proc.children(recursive=True)]
    assert stop_stack(team_stack.state_dir) == ["ray", "mlflow", "s3", "postgres"]
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert stack_status(team_stack.state_dir) == dict.fromkeys(COMPONENTS)

    again = start_stack(team_stack.state_dir)  # ports and credentials from its state
    team_stack.pids.update(again.pids)
    assert again.credentials == team_stack.credentials and again.ports == team_stack.ports
    env = again.client_env()
    os.environ.update(env)  # restored below: the client reads credentials from the environment
    try:
        client = get_client(again.tracking_uri)
        tracked = client.get_run(_trained(team_repo)["mlflow_run_id"])
        assert tracked.info.status == "FINISHED"
        assert client.get_model_version_by_alias("fitscope-higgs", "debug").run_id == (
            tracked.info.run_id
        )
    finally:
        for key in env:
            os.environ.pop(key, None)
    assert _search_experiments(again, again.credentials["admin_password"]) == 200
    model_id = _trained(team_repo)["mlflow_model_uri"].removeprefix("models:/")
    listed = again.s3_client().list_objects_v2(Bucket=BUCKET)["Contents"]
    assert any(model_id in o["Key"] and o["Key"].endswith("MLmodel") for o in listed)
