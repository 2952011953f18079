"""The training entry point: Hydra config -> Lightning -> outputs + MLflow run."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose, last_error_line, run_train, runs_of
from test_precision import expected_auto_precision

from fitscope.core.errors import FitscopeError
from fitscope.model.mlp import ProbabilityModel, build_mlp
from fitscope.pipeline.job import train, validate
from fitscope.pipeline.stages import train_sweep
from fitscope.pipeline.variants import stage_target
from fitscope.results.verdict import own_verdict
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.run import RunTracker
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import KIND_TAG, NOTE_TAG, PARENT_TAG, git_state, source_tags


def debug_cfg(processed_dir, run_dir, *overrides):
    return compose(
        "trainer=debug", f"paths.data_dir={processed_dir}", f"paths.run_dir={run_dir}", *overrides
    )


def only_run(client, study):
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_higgs_debug_run_is_fully_tracked(processed_dir, tmp_path, mlflow_uri):
    cfg = debug_cfg(
        processed_dir, tmp_path / "run", "model=small", "regularization=l2", "study=t_higgs"
    )
    value = train(cfg)
    client = get_client()
    run = only_run(client, "t_higgs")
    assert run.info.status == "FINISHED" and run.info.run_name == "higgs-small-l2"
    p, tags, m = run.data.params, run.data.tags, run.data.metrics
    assert p["model.width"] == "16" and p["regularization.l2"] == "0.001"
    assert p["optimizer.name"] == "adam" and p["data.batch_size"] == "500"
    for key in (
        "fitscope.variant",
        "fitscope.dataset",
        "fitscope.config_hash",
        "fitscope.data_manifest_sha256",
        "mlflow.source.git.commit",
        "fitscope.git_dirty",
    ):
        assert tags[key], key
    assert tags["fitscope.dataset"] == "higgs"
    # trainer.precision=auto (the default) resolved on this machine, recorded in both places.
    assert tags["fitscope.precision"] == expected_auto_precision("cpu")
    history = client.get_metric_history(run.info.run_id, "val/loss")
    assert [h.step for h in history] == [0, 1, 2]
    assert m["train/l2_penalty"] > 0
    assert value == pytest.approx(m["best/val/loss"])
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert summary["mlflow_run_id"] == run.info.run_id
    # The test split is scored by the training process: in metrics.json and the run.
    assert summary["test_loss"] == pytest.approx(m["test/loss"]) and 0 < m["test/loss"] < 5
    assert 0 <= summary["test_auroc"] <= 1 and m["train_eval/loss"] == summary["train_eval_loss"]
    # Calibration, and what early stopping bought: the last epoch's weights on the test split.
    assert 0 <= m["test/ece"] <= 1 and summary["test_ece"] == pytest.approx(m["test/ece"])
    last = m["last_epoch/test/loss"]
    assert summary["last_epoch_test_loss"] == pytest.approx(last)
    if m["fit/best_epoch"] == m["fit/stopped_epoch"]:
        assert last == m["test/loss"]  # the selected epoch is the last
    else:
        assert last != m["test/loss"]
    import mlflow

    bought = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/early_stopping.json")
    assert bought["selected_epoch"] == m["fit/best_epoch"]
    assert bought["test_last"]["last_epoch/test/loss"] == pytest.approx(last)
    assert [r["patience"] for r in bought["patience_replay"]] == [10, 20, 50, 100, 200]
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    for name in ("calibration.csv", "roc.csv", "pr.csv"):  # the test split's curves
        assert (tmp_path / "run" / name).stat().st_size > 0 and name in logged, name
    assert summary["precision"] == tags["fitscope.precision"]
    # trainer.num_threads=auto took the worker's OMP_NUM_THREADS (tests/conftest.py).
    threads = os.environ["OMP_NUM_THREADS"]
    assert tags["fitscope.num_threads"] == str(summary["num_threads"]) == threads
    assert summary["best_gap_loss"] == pytest.approx(
        summary["best_val_loss"] - summary["best_train_loss"]
    )
    assert (tmp_path / "run" / "history.csv").read_text().count("\n") == 4
    # MLflow's system metrics (the System metrics tab): sampled while it trained, and at
    # its end (a run this short has no full interval).
    for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
        samples = client.get_metric_history(run.info.run_id, f"system/{name}")
        assert samples and all(s.value >= 0 for s in samples), name
    assert m["system/system_memory_usage_megabytes"] > 0
    _assert_run_page_says_what_the_run_found(client, run, tmp_path / "run", processed_dir)

    # The logged model predicts exactly what the saved best weights predict.
    import mlflow

    x = np.load(processed_dir / "higgs" / "val_x.npy")[:64]
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    mlp = build_mlp(28, 1, width=16, depth=2)
    mlp.load_state_dict(saved["state_dict"])
    expected = ProbabilityModel(mlp.eval(), "binary")(torch.from_numpy(x)).detach().numpy()
    model_uri = f"runs:/{run.info.run_id}/model"
    mlflow.set_tracking_uri(mlflow_uri)
    loaded = mlflow.pyfunc.load_model(model_uri)
    np.testing.assert_allclose(np.asarray(loaded.predict(x)), expected, rtol=1e-5, atol=1e-6)
    assert ((expected >= 0) & (expected <= 1)).all()


def _assert_run_page_says_what_the_run_found(client, run, run_dir, processed_dir) -> None:
    """What `mlflow ui` shows of a run: summary and model metrics at the selected epoch, the
    verdict and description, the files, the dataset, the source; the experiment's landing."""
    import csv
    import getpass

    import yaml

    run_id, tags, m = run.info.run_id, run.data.tags, run.data.metrics
    with open(run_dir / "history.csv", newline="") as fh:
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]
    selected = int(m["fit/best_epoch"])
    row = rows[selected]
    for key in ("best/val/loss", "fit/stopped_epoch", "model/n_params"):
        assert [h.step for h in client.get_metric_history(run_id, key)] == [selected], key
    assert m["best/val/loss"] == pytest.approx(row["val/loss"])
    assert "lr" not in m and "params" not in m and "best_epoch" not in m  # grouped keys only
    assert m["optimizer/lr"] > 0
    # The logged model's page: the metrics of the restored epoch, not of step 0.
    summary = json.loads((run_dir / "metrics.json").read_text())
    model = client.get_logged_model(summary["mlflow_model_uri"].removeprefix("models:/"))
    on_model = {x.key: x for x in model.metrics}
    assert {x.step for x in model.metrics} == {selected}
    assert on_model["val/loss"].value == pytest.approx(row["val/loss"])
    assert on_model["train/loss"].value == pytest.approx(row["train/loss"])
    assert on_model["best/val/loss"].value == pytest.approx(row["val/loss"])
    # Verdict (the report's rule) and the description.
    assert tags["fitscope.verdict"] == own_verdict(rows)
    note = tags["mlflow.note.content"]
    head = f"**{run.info.run_name}** (adhoc profile): **{tags['fitscope.verdict']}**"
    assert note.startswith(head)
    assert f"Selected epoch {selected}, stopped at epoch {len(rows) - 1}" in note
    assert f"loss {row['val/loss']:.4f}" in note
    # The files: history, metrics, the resolved config, the learning curves.
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.csv", "metrics.json", "learning_curves.png", "config"} <= files
    assert {a.path for a in client.list_artifacts(run_id, "config")} >= {"config/resolved.yaml"}

    def artifact(path: str) -> Path:
        return Path(client.download_artifacts(run_id, path))

    resolved = yaml.safe_load(artifact("config/resolved.yaml").read_text())
    assert resolved["paths"]["data_dir"] == str(processed_dir)  # no ${...} left
    assert json.loads(artifact("metrics.json").read_text()) == summary
    assert artifact("learning_curves.png").read_bytes().startswith(b"\x89PNG")
    # The dataset (the Dataset column) and the source tags.
    (ds,) = client.get_run(run_id).inputs.dataset_inputs
    assert ds.dataset.name == "higgs"
    assert ds.dataset.digest == tags["fitscope.data_manifest_sha256"][:36]
    assert json.loads(ds.dataset.profile)["train"] > 0
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["mlflow.source.name"] == "fitscope-train"
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags[KIND_TAG] == "custom_model_development"  # UI opens on runs
    assert "What to compare" in exp.tags[NOTE_TAG]


def test_params_yaml_variants_have_the_names_a_hydra_sweep_gives_them():
    import shlex

    import yaml
    from conftest import REPO

    variants = yaml.safe_load((REPO / "params.yaml").read_text())["variants"]
    for dataset, group in variants.items():
        for key, spec in group.items():
            cfg = compose(*shlex.split(spec["overrides"]))
            assert (cfg.variant, cfg.data.name) == (key, dataset)
    assert compose("model=small", "regularization=l2").variant == "higgs-small-l2"
    assert compose("+experiment=higgs_regularization", "model=small").variant == "higgs-small"


def test_git_dirtiness_ignores_only_what_dvc_writes(tmp_path, monkeypatch):
    import subprocess

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    for name in ("params.yaml", "dvc.lock", "code.py"):
        (tmp_path / name).write_text("a\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("b\n")
    (tmp_path / "dvc.lock").write_text("b\n")
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert source_tags("x")["fitscope.git_dirty"] == "true"
    monkeypatch.setenv("DVC_STAGE", "train@higgs")
    monkeypatch.setenv("DVC_EXP_NAME", "funny-exp")
    tags = source_tags("x")
    assert tags["fitscope.git_dirty"] == "false"
    assert tags["fitscope.git_dirty_ignores"] == "params.yaml, dvc.lock (written by DVC itself)"
    assert tags["fitscope.dvc_exp"] == "funny-exp"
    (tmp_path / "code.py").write_text("b\n")
    assert source_tags("x")["fitscope.git_dirty"] == "true"


def test_mnist_debug_run(processed_dir, tmp_path, mlflow_uri):
    cfg = debug_cfg(
        processed_dir,
        tmp_path / "run",
        "+experiment=mnist_weight_decay",
        "trainer.max_epochs=2",
        "study=t_mnist",
        "regularization=weight_decay",
        "logger.system_metrics=false",
    )
    value = train(cfg)
    run = only_run(get_client(), "t_mnist")
    assert not [k for k in run.data.metrics if k.startswith("system/")]  # switched off
    assert run.data.params["optimizer.name"] == "sgd"
    assert run.data.params["data.train_size"] == "300"
    assert run.data.params["regularization.l2_include_output"] == "True"
    assert run.data.metrics["fit/best_epoch"] == 1  # no restore: the last epoch is reported
    assert value == pytest.approx(run.data.metrics["best/val/acc"])
    assert 0.0 <= value <= 1.0


def test_finished_config_is_skipped_unless_forced(processed_dir, tmp_path, mlflow_uri, caplog):
    cfg = debug_cfg(processed_dir, tmp_path / "run", "study=t_skip", "logger.log_model=false")
    first = train(cfg)
    with caplog.at_level("INFO", logger="fitscope"):
        again = train(cfg)
    assert again == first
    assert "already finished with this config" in caplog.text
    client = get_client()
    exp = client.get_experiment_by_name("t_skip").experiment_id
    assert len(client.search_runs([exp])) == 1
    train(
        debug_cfg(
            processed_dir, tmp_path / "run", "study=t_skip", "logger.log_model=false", "force=true"
        )
    )
    assert len(client.search_runs([exp])) == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model=huge", None),
        ("regularization.dropout=1.0", "regularization.dropout=1.0 must be < 1.0"),
        ("regularization.l2=-0.1", "regularization.l2=-0.1 must be >= 0.0"),
        ("model.activation=swish", "model.activation='swish' is not valid"),
        ("optimizer.lr=0", "optimizer.lr must be > 0"),
        ("regularization=augment", "augment_shift applies to MNIST images only"),
        ("callbacks.early_stopping.patience=0", "patience=0 must be >= 1"),
        ("trainer.precision=64", "trainer.precision='64' is not valid"),
        ("trainer.precision=16-mixed", "16-mixed needs trainer=gpu"),
    ],
)
def test_invalid_config_is_refused_before_any_work(override, message, processed_dir, tmp_path):
    if message is None:  # an unknown group option is refused by Hydra itself
        from hydra.errors import MissingConfigException

        with pytest.raises(MissingConfigException):
            debug_cfg(processed_dir, tmp_path, override)
        return
    with pytest.raises(FitscopeError, match=message.replace("(", r"\(")):
        validate(debug_cfg(processed_dir, tmp_path, override))


def test_gpu_without_cuda_is_refused_before_any_work(processed_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FitscopeError, match=r"trainer=gpu but torch .* sees no CUDA GPU\. Fix:"):
        validate(debug_cfg(processed_dir, tmp_path, "trainer.accelerator=gpu"))


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_cli_batch_size_too_large_is_one_line_and_nothing_is_logged(
    processed_dir, tmp_path, mlflow_uri
):
    proc = run_train(
        [f"paths.data_dir={processed_dir}", "data.batch_size=50000"], tmp_path, mlflow_uri
    )
    assert last_error_line(proc, 2) == (
        "fitscope: error: data.batch_size=50000 is larger than the 8984 training "
        "rows. Fix: lower data.batch_size"
    )
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_nan_loss_marks_the_run_failed_and_exits_nonzero(processed_dir, tmp_path, mlflow_uri):
    proc = run_train(
        [
            f"paths.data_dir={processed_dir}",
            "trainer=debug",
            "study=t_nan",
            "optimizer=sgd",
            "optimizer.lr=1e12",
            "scheduler=none",
            "model=large",
        ],
        tmp_path,
        mlflow_uri,
    )
    assert proc.returncode == 2, proc.stderr
    assert "fitscope: error: training loss became nan" in proc.stderr
    client = get_client()
    run = only_run(client, "t_nan")
    assert run.info.status == "FAILED"
    assert "training loss became nan" in run.data.tags["fitscope.failure"]
    assert math.isnan(client.get_metric_history(run.info.run_id, "train/loss")[-1].value)


@pytest.mark.slow
def test_joblib_sweep_nests_jobs_under_one_parent(processed_dir, tmp_path, mlflow_uri):
    args = [
        "-m",
        f"paths.data_dir={processed_dir}",
        "trainer=debug",
        "study=t_sweep",
        "model=tiny,small",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "logger.log_model=false",
    ]
    proc = run_train(args, tmp_path, mlflow_uri)
    assert proc.returncode == 0, proc.stderr
    # Each job, in its worker process, counts itself: 1/2 then 2/2 (in either job's order).
    assert sorted(re.findall(r"^sweep \S+: (\d/\d) jobs done$", proc.stderr, re.M)) == [
        "1/2",
        "2/2",
    ]
    client = get_client()
    parents, children = runs_of(client, "t_sweep")
    assert len(parents) == 1 and len(children) == 2
    assert parents[0].info.status == "FINISHED"
    assert {c.data.tags[PARENT_TAG] for c in children} == {parents[0].info.run_id}
    assert {c.info.run_name for c in children} == {"higgs-tiny", "higgs-small"}
    commit = git_state(tmp_path)[0]  # the sweep ran there
    assert parents[0].info.run_name == f"t_sweep · adhoc · {commit[:7]}"
    # Each child holds its own overrides (the parent the sweep's).
    own = [set(c.data.tags["fitscope.overrides"].split()) for c in children]
    assert sorted(len(o & {"model=tiny", "model=small"}) for o in own) == [1, 1]
    assert {"model=tiny", "model=small"} <= own[0] | own[1]
    assert sorted(c.data.tags["fitscope.job_num"] for c in children) == ["0", "1"]
    for child in children:
        assert len(client.get_metric_history(child.info.run_id, "val/loss")) == 3
    best = parents[0].data.tags["fitscope.best_run_id"]
    assert best in {c.info.run_id for c in children}
    # Re-running the same sweep (after a crash, say) skips both finished jobs and files
    # them under the same parent run.
    again = run_train(args, tmp_path, mlflow_uri)
    assert again.returncode == 0, again.stderr
    assert (again.stdout + again.stderr).count("already finished with this config") == 2
    assert sum(map(len, runs_of(client, "t_sweep"))) == 3  # no new parent or child


def _writer(args):
    uri, name = args

    # Each worker opens the (fresh) store and the experiment itself: the races on table
    # creation and on the experiment name are what the store lock prevents.
    client = get_client(uri)
    exp_id = ensure_experiment(client, "t_concurrent")
    tracker = RunTracker.create(client, exp_id, name, {"worker": name}, {"fitscope.w": name})
    rows = [
        {"epoch": e, "train/loss": 1.0 / (e + 1), "val/loss": 2.0 / (e + 1)} for e in range(300)
    ]
    for start in range(0, 300, 25):  # batched like EpochRowSender
        tracker.log_rows(rows[start : start + 25])
    tracker.finish()
    return tracker.run_id


@pytest.mark.slow
def test_four_concurrent_writers_on_a_fresh_store_lose_nothing(tmp_path):
    import multiprocessing as mp

    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    with mp.get_context("spawn").Pool(4) as pool:
        run_ids = pool.map(_writer, [(uri, f"w{i}") for i in range(4)])
    client = get_client(uri)
    exp = client.get_experiment_by_name("t_concurrent")
    assert len(client.search_runs([exp.experiment_id])) == 4
    assert len(client.search_experiments()) == 2  # Default + t_concurrent, no duplicate
    for run_id in run_ids:
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.info.experiment_id == exp.experiment_id
        for key in ("train/loss", "val/loss"):
            assert len(client.get_metric_history(run_id, key)) == 300


@pytest.mark.slow
def test_a_failed_job_fails_a_plain_sweep(processed_dir, tmp_path, mlflow_uri):
    # One job diverges (NaN), the other trains: the sweep finishes both, then exits 1.
    proc = run_train(
        [
            "-m",
            f"paths.data_dir={processed_dir}",
            "trainer=debug",
            "study=t_mixed",
            "optimizer=sgd",
            "scheduler=none",
            "model=large",
            "optimizer.lr=1e12,0.01",
            "logger.log_model=false",
        ],
        tmp_path,
        mlflow_uri,
    )
    assert last_error_line(proc, 1).startswith(
        "fitscope: error: 1 job(s) of the sweep failed (higgs-large)"
    )
    _, children = runs_of(get_client(), "t_mixed")
    statuses = sorted(r.info.status for r in children)
    assert statuses == ["FAILED", "FINISHED"]


def test_a_dvc_train_stage_is_one_sweep_of_its_datasets_variants(monkeypatch):
    import yaml
    from conftest import REPO

    monkeypatch.setenv("DVC_STAGE", "train@higgs")
    assert stage_target(None) == "higgs"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["study"].update(seeds="0,1", jobs="auto")
    overrides, jobs = train_sweep(params, "higgs")
    assert [job[-1] for job in jobs] == [f"variant={v}" for v in params["variants"]["higgs"]]
    assert "seed=0,1" in overrides and "hydra.sweep.dir=runs/higgs" in overrides
    assert "hydra/launcher=joblib" in overrides  # 16 jobs, 2 cores here: 2 at a time
    assert f"hydra.launcher.n_jobs={min(16, len(os.sched_getaffinity(0)))}" in overrides
    params["study"]["jobs"] = 1  # one at a time, in the stage's own process
    assert not [o for o in train_sweep(params, "higgs")[0] if "launcher" in o]
    one_overrides, one = train_sweep(params, "mnist-wd")  # one variant, by hand
    assert one == [
        [
            *params["variants"]["mnist"]["mnist-wd"]["overrides"].split(),
            "study=mnist_weight_decay",
            "variant=mnist-wd",
        ]
    ]
    assert "hydra.sweep.dir=runs/mnist" in one_overrides
    # seed=range(3) is three jobs of one variant: auto runs them 2 at a time on 2 cores
    three = {**params, "study": {**params["study"], "seeds": "range(3)", "jobs": "auto"}}
    cores = min(3, len(os.sched_getaffinity(0)))
    assert f"hydra.launcher.n_jobs={cores}" in train_sweep(three, "mnist-wd")[0]
    for bad in (0, "two", True):
        params["study"]["jobs"] = bad
        with pytest.raises(FitscopeError, match=r"study.jobs=.* is not auto or a count"):
            train_sweep(params, "higgs")
    params["study"]["jobs"] = 1
    with pytest.raises(FitscopeError, match=r"no variants\.cifar and no variant 'cifar'"):
        train_sweep(params, "cifar")
    params["variants"]["mnist"]["mnist-wd"]["overrides"] += " study_description=${data.name}"
    with pytest.raises(FitscopeError, match=r"mnist-wd\.overrides holds a `\$\{\.\.\.\}`"):
        train_sweep(params, "mnist")
    params["variants"]["cifar"] = {}
    with pytest.raises(FitscopeError, match=r"variants\.cifar is empty"):
        train_sweep(params, "cifar")
    params["variants"]["mnist"]["mnist-wd"]["overrides"] = "regularization=weight_decay"
    params["variants"]["mnist"]["higgs"] = {"study": "s", "overrides": ""}
    with pytest.raises(FitscopeError, match=r"variants\.mnist\.higgs is named like a dataset"):
        train_sweep(params, "mnist")
    del params["variants"]["mnist"]["higgs"]
    params["variants"]["mnist"]["higgs-tiny"] = params["variants"]["higgs"]["higgs-tiny"]
    with pytest.raises(FitscopeError, match=r"'higgs-tiny' is under both variants\.higgs and"):
        train_sweep(params, "mnist")


@pytest.mark.slow  # a training subprocess
def test_a_diverged_run_is_flagged_not_passed_silently(processed_dir, tmp_path, mlflow_uri):
    args = [f"paths.data_dir={processed_dir}", "trainer=debug", "optimizer.lr=1e6"]
    proc = run_train([*args, "study=t_diverged", "progress=false"], tmp_path, mlflow_uri)
    assert proc.returncode == 0, proc.stderr  # finite: it ends FINISHED, flagged
    output = (proc.stdout + proc.stderr).splitlines()
    flagged = [line for line in output if "diverged" in line]
    assert len(flagged) == 1 and "Fix: lower optimizer.lr" in flagged[0], output
    run = only_run(get_client(mlflow_uri), "t_diverged")
    assert run.info.status == "FINISHED"
    assert run.data.tags["fitscope.verdict"] == "diverged"
    assert run.data.tags["fitscope.diverged"].startswith("diverged: best val loss")
    constant = run.data.metrics["fit/constant_val_loss"]
    assert 0.68 < constant < 0.70  # HIGGS: nearly balanced labels
    assert run.data.metrics["best/val/loss"] > 2 * constant
