"""`dvc repro` end to end on a fresh copy of the repository (embedded sources)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
from conftest import REPO, run

from fitscope.tracking.store import get_client

pytestmark = pytest.mark.slow


def test_data_stages_run_then_are_a_noop(repo_copy):
    first = run(["dvc", "repro", "split_higgs", "split_mnist"], repo_copy)
    assert "Running stage 'fetch_higgs'" in first.stdout
    assert "Running stage 'split_mnist'" in first.stdout
    manifest = json.loads((repo_copy / "data/processed/higgs/manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 8984
    assert (repo_copy / "data/processed/mnist/train_x.npy").exists()
    second = run(["dvc", "repro", "split_higgs", "split_mnist"], repo_copy)
    assert "Running stage" not in second.stdout
    assert "Data and pipelines are up to date." in second.stdout
    # data.dvc (the empty local mirror) is not in this fresh clone's cache, and no stage
    # depends on it, so the pipeline ran anyway; dvc status reports exactly that.
    status = run(["dvc", "status", "data.dvc"], repo_copy)
    assert "not in cache" in status.stdout and "data/mirror" in status.stdout


def test_the_readmes_revert_command_undoes_a_repro_and_an_experiment(repo_copy):
    # `dvc repro` stages the dvc.lock it writes (autostage), `dvc exp run -S` (what `make
    # demo` runs) also edits params.yaml: the README's line puts both back.
    readme = (REPO / "README.md").read_text()
    (revert,) = [ln for ln in readme.splitlines() if ln.startswith("git checkout")]
    revert = revert.split("#")[0].strip()
    makefile = (REPO / "Makefile").read_text()
    assert f"classic:  {revert} && " in makefile  # what `make demo` prints says the same
    run(["dvc", "exp", "run", "-S", "study.profile=debug", "split_higgs"], repo_copy)
    run(["dvc", "repro", "split_mnist"], repo_copy)
    changed = run(["git", "status", "--porcelain", "params.yaml", "dvc.lock"], repo_copy)
    status = {line[3:]: line[:2] for line in changed.stdout.splitlines()}
    assert status.keys() == {"dvc.lock", "params.yaml"} and status["dvc.lock"][0] == "M"
    run(shlex.split(revert), repo_copy)
    after = run(["git", "status", "--porcelain", "params.yaml", "dvc.lock"], repo_copy)
    assert after.stdout == ""


def test_changing_a_split_param_reruns_only_that_dataset(repo_copy):
    run(["dvc", "repro", "split_higgs", "split_mnist"], repo_copy)
    params = repo_copy / "params.yaml"
    params.write_text(params.read_text().replace("val_rows: 1000", "val_rows: 800"))
    out = run(["dvc", "repro", "split_higgs", "split_mnist"], repo_copy).stdout
    assert "Running stage 'fetch_higgs'" in out  # val_rows decides how many rows to stream
    assert "Running stage 'split_higgs'" in out
    assert "Running stage 'split_mnist'" not in out
    manifest = json.loads((repo_copy / "data/processed/higgs/manifest.json").read_text())
    assert manifest["splits"]["val"]["rows"] == 800


def set_param(repo, dotted: str, update) -> None:
    """Set params.yaml key ``a.b.c`` to ``update(old value)`` (or to ``update``)."""
    import yaml

    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, last = dotted.split(".")
    node = params
    for key in parents:
        node = node[key]
    node[last] = update(node[last]) if callable(update) else update
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def study_repo(tmp_path_factory):
    """The whole pipeline at debug size on a fresh copy of the repository, run the way
    `make demo` runs it: `dvc exp run -S study.profile=...` (the results are applied to
    the workspace). Every variant of params.yaml trains: one stage per dataset."""
    from conftest import make_repo_copy

    repo = make_repo_copy(tmp_path_factory.mktemp("study") / "repo")
    proc = run(["dvc", "exp", "run", "-S", "study.profile=debug"], repo)
    assert "Experiment results have been applied to your workspace." in proc.stdout
    return repo, proc.stdout + proc.stderr


def test_full_pipeline_runs_every_stage(study_repo):
    import yaml

    repo, out = study_repo
    variants = yaml.safe_load((repo / "params.yaml").read_text())["variants"]
    assert sum(len(group) for group in variants.values()) == 13  # the repository's study
    ran = sorted(line.split("'")[1] for line in out.splitlines() if "Running stage" in line)
    assert ran == [
        "diagnose",
        "evaluate@higgs",
        "evaluate@mnist",
        "fetch_higgs",
        "fetch_mnist",
        "report",
        "split_higgs",
        "split_mnist",
        "train@higgs",
        "train@mnist",
    ]
    assert f"sweep train@higgs: {len(variants['higgs'])}/{len(variants['higgs'])} jobs done" in out
    report = (repo / "reports" / "study.md").read_text()
    assert "debug profile" in report
    for dataset, group in variants.items():
        for name in group:
            assert f"| {name} |" in report
            assert (repo / "runs" / dataset / name / "0" / "metrics.json").exists()
    for title in ("Learning curve: training-set size", "Validation curves", "Early stopping"):
        assert f"\n## {title}\n" in report
    assert "\n## Calibration\n" in report


def test_the_diagnostics_train_their_points_and_the_report_draws_them(study_repo):
    import csv

    repo, _ = study_repo
    small = json.loads(
        (
            repo / "runs" / "diagnostics" / "higgs-large.train_size-500" / "0" / "metrics.json"
        ).read_text()
    )
    assert small["train_rows"] == 500 and "mlflow_model_uri" not in small  # no model logged
    with open(repo / "reports" / "diagnostics" / "higgs_train_size" / "higgs-large.csv") as fh:
        rows = list(csv.DictReader(fh))
    # The four sizes of params.yaml and higgs-large's own run on all 8,984 rows.
    assert [int(float(r["value"])) for r in rows] == [500, 1000, 2000, 4000, 8984]
    assert all(0.3 < float(r["val_loss"]) < 1.5 and float(r["train_loss"]) > 0 for r in rows)
    with open(repo / "reports" / "diagnostics" / "higgs_l2" / "higgs-l2.csv") as fh:
        assert [float(r["value"]) for r in csv.DictReader(fh)] == [0.0, 0.001, 0.01]  # 0: origin
    assert (repo / "reports" / "figures" / "mnist_train_size.png").stat().st_size > 10_000
    client = get_client(f"sqlite:///{repo / 'mlflow.db'}")
    run_id = small.get("mlflow_run_id")
    parent = client.get_run(run_id).data.tags["mlflow.parentRunId"]
    files = {a.path for a in client.list_artifacts(parent, "report")}
    assert {"report/study.md", "report/higgs_train_size.png"} <= files
    # The report's answers on the diagnostic's runs: each point's verdict, the parent's table.
    verdict = client.get_run(run_id).data.tags["fitscope.verdict"]
    assert verdict in {"overfitting", "underfitting", "good fit", "double descent", "diverged"}
    note = client.get_run(parent).data.tags["mlflow.note.content"]
    assert note.startswith("Diagnostic **higgs_train_size** (debug profile)")
    assert "| higgs-large | 500 |" in note
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.name == "higgs_train_size"
    assert "diagnostic train_size" in experiment.tags["mlflow.note.content"]


def test_report_numbers_match_metrics_files_and_mlflow(study_repo):

    repo, _ = study_repo
    report = (repo / "reports" / "study.md").read_text()
    client = get_client(f"sqlite:///{repo / 'mlflow.db'}")
    for dataset, name in (
        ("higgs", "higgs-tiny"),
        ("higgs", "higgs-combined"),
        ("mnist", "mnist-wd"),
    ):
        test = json.loads((repo / "metrics" / f"{dataset}.json").read_text())[name]
        train = json.loads((repo / "runs" / dataset / name / "0" / "metrics.json").read_text())
        row = next(line for line in report.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert f"{train['best_val_loss']:.4f}" == cells[2]
        assert f"{test['test_acc']:.4f}" in cells
        assert train["mlflow_run_id"] == cells[-1]
        run_ = client.get_run(train["mlflow_run_id"])
        assert run_.info.status == "FINISHED"
        assert run_.data.metrics["best/val/loss"] == pytest.approx(train["best_val_loss"])
        assert run_.data.metrics["test/acc"] == pytest.approx(test["test_acc"])
        assert run_.data.tags["mlflow.parentRunId"]  # nested under the study's parent run


def test_profile_alias_loads_and_predicts_and_no_debug_champion(study_repo):
    import mlflow
    import numpy as np
    from mlflow.exceptions import MlflowException

    repo, _ = study_repo
    uri = f"sqlite:///{repo / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)  # an earlier test in this worker may have set another
    model = mlflow.pyfunc.load_model("models:/fitscope-higgs@debug")
    x = np.load(repo / "data/processed/higgs/test_x.npy")[:10]
    probs = np.asarray(model.predict(x))
    assert probs.shape == (10, 1) and ((probs >= 0) & (probs <= 1)).all()
    client = get_client(uri)
    with pytest.raises(MlflowException):  # @champion is the classic protocol's only
        client.get_model_version_by_alias("fitscope-higgs", "champion")
    version = client.get_model_version_by_alias("fitscope-mnist", "debug")
    run = client.get_run(version.run_id)
    assert version.tags["fitscope.profile"] == "debug"
    assert version.tags["fitscope.commit"] == run.data.tags["mlflow.source.git.commit"]
    assert version.tags["fitscope.verdict"] == run.data.tags["fitscope.verdict"]
    assert version.tags["fitscope.variant"] == run.data.tags["fitscope.variant"]
    assert float(version.tags["test/acc"]) == pytest.approx(run.data.metrics["test/acc"], abs=1e-4)
    assert version.description.startswith(f"{version.tags['fitscope.variant']} from the debug")


def test_dvc_runs_are_named_tagged_and_annotated(study_repo):
    """What the DVC pipeline leaves in MLflow besides the numbers (issue: the mlflow ui review)."""

    repo, _ = study_repo
    client = get_client(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("higgs_capacity")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("fitscope.role") == "parent"]
    commit = parent.data.tags["mlflow.source.git.commit"]
    assert parent.info.run_name == f"higgs_capacity · debug · {commit[:7]}"
    assert "fitscope.overrides" not in parent.data.tags  # each child holds its own
    assert "| higgs-tiny |" in parent.data.tags["mlflow.note.content"]
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/study.md", "report/study.html", "report/higgs_capacity.png"} <= files
    children = [r for r in runs if r is not parent]
    assert sorted(r.info.run_name for r in children) == sorted(
        ["higgs-tiny", "higgs-small", "higgs-medium", "higgs-large"]
    )
    for child in children:
        tags = child.data.tags
        assert f"model={tags['fitscope.variant'].split('-')[1]}" in tags["fitscope.overrides"]
        assert tags["mlflow.source.name"] == "dvc stage train@higgs"
        assert tags["fitscope.git_dirty"] == "false"  # params.yaml/dvc.lock: DVC's own writes
        assert tags["fitscope.dvc_exp"]  # the name `dvc exp run` gave the experiment
        assert tags["fitscope.verdict"] in tags["mlflow.note.content"]
        assert "Test: loss" in tags["mlflow.note.content"]
        (ds,) = child.inputs.dataset_inputs
        assert ds.dataset.name == "higgs"


def test_each_study_of_a_train_stage_has_one_parent_closed_with_its_children(study_repo):
    """A train stage's sweep spans studies: one parent per study, made before the jobs
    and closed by the sweep with every child counted."""
    import collections

    import yaml

    repo, _ = study_repo
    variants = yaml.safe_load((repo / "params.yaml").read_text())["variants"]
    per_study = collections.Counter(v["study"] for g in variants.values() for v in g.values())
    client = get_client(f"sqlite:///{repo / 'mlflow.db'}")
    for study, count in per_study.items():
        exp = client.get_experiment_by_name(study)
        runs = client.search_runs([exp.experiment_id])
        (parent,) = [r for r in runs if r.data.tags.get("fitscope.role") == "parent"]
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["sweep/children_finished"] == count
        children = [r for r in runs if r is not parent]
        assert len(children) == count
        assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}


def test_metrics_and_plots_commands_read_the_outputs(study_repo):
    repo, _ = study_repo
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    data = json.loads(shown)
    files = next(iter(data.values()))["data"]
    assert files["metrics/higgs.json"]["data"]["higgs-tiny"]["seeds"] == 1
    plots = run(["dvc", "plots", "show", "-o", "plots_out"], repo)
    assert (repo / "plots_out" / "index.html").exists(), plots.stdout


def test_second_repro_is_a_noop_and_one_change_reruns_only_its_dataset(study_repo):
    repo, _ = study_repo
    again = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in again and "Data and pipelines are up to date." in again
    higgs = json.loads((repo / "metrics" / "higgs.json").read_text())
    set_param(repo, "variants.mnist.mnist-augment.overrides", lambda o: f"{o} optimizer.lr=0.02")
    changed = run(["dvc", "repro"], repo).stdout
    ran = sorted(
        line.split("'")[1] for line in changed.splitlines() if line.startswith("Running stage")
    )
    assert ran == ["evaluate@mnist", "report", "train@mnist"]
    assert json.loads((repo / "metrics" / "higgs.json").read_text()) == higgs  # not retrained


def test_optional_search_pipeline(study_repo):
    repo, _ = study_repo
    set_param(repo, "search.trials", 3)
    set_param(repo, "search.epochs", 2)
    out = run(["dvc", "repro", "search/dvc.yaml"], repo).stdout
    assert "Running stage 'search/dvc.yaml:search@random'" in out
    assert "Running stage 'search/dvc.yaml:search@tpe'" in out
    for study in ("mnist_search_random", "mnist_search_tpe"):
        md = (repo / "search" / "reports" / study / "search.md").read_text()
        assert md.count("| `") == 3
        assert "Random vs TPE on the same budget" in md
        # Optuna's history of both studies, from the journals in the stages' outputs.
        assert (repo / "search" / "reports" / study / "optimization_history.png").exists()
    for sampler in ("random", "tpe"):
        assert (repo / "search" / "runs" / sampler / "optuna.journal").stat().st_size > 0
    # The main pipeline neither runs nor depends on it.
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_ui_review_in_a_real_browser(study_repo):
    """Headless Chromium on `mlflow ui` over the debug pipeline's store: what a reviewer
    checks, with the screenshots docs/review.md shows (written to docs/review/)."""
    import os
    import shutil
    import signal
    import subprocess
    import time
    import urllib.request

    from conftest import REPO

    chromium = shutil.which("chromium")
    assert chromium, (
        "no chromium browser. Fix: `apt-get install -y chromium` as root (`make test` does "
        "where it runs as root with apt)"
    )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing. Fix: pip install -e '.[dev]' (`make test` does)")

    repo, _ = study_repo
    client = get_client(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("higgs_capacity")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("fitscope.role") == "parent"]
    child = next(r for r in runs if r.info.run_name == "higgs-large")
    trained = json.loads(
        (repo / "runs" / "higgs" / "higgs-large" / "0" / "metrics.json").read_text()
    )
    selected = int(trained["best_epoch"])
    model_id = trained["mlflow_model_uri"].removeprefix("models:/")
    version = client.get_model_version_by_alias("fitscope-higgs", "debug")

    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [
            *(
                str(Path(sys.executable).with_name("mlflow")),
                "ui",
                "--backend-store-uri",
                f"sqlite:///{repo / 'mlflow.db'}",
            ),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
        ],
        cwd=repo,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    shots = REPO / "docs" / "review"
    shots.mkdir(exist_ok=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, "mlflow ui did not start within 90 s"
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(60_000)

            def visit(route: str, wait_for: str, shot: str) -> str:
                # The UI never reaches "networkidle": wait for the text a person looks for.
                page.goto(f"{base}/#{route}", wait_until="load")
                page.get_by_text(wait_for).first.wait_for()
                page.wait_for_timeout(500)  # let the rest of the page settle for the picture
                page.screenshot(path=shots / shot)
                return page.inner_text("body")

            ml = "workflowType=machine_learning"
            body = visit(f"/experiments?{ml}", "mnist_weight_decay", "experiments.png")
            for study in ("higgs_capacity", "higgs_regularization", "mnist_dropout"):
                assert study in body
            assert "What to compare" in body  # the experiment's description
            body = visit(f"/experiments/{exp.experiment_id}?{ml}", parent.info.run_name, "runs.png")
            assert "Training runs" in body
            body = visit(
                f"/experiments/{exp.experiment_id}/runs/{parent.info.run_id}",
                "higgs-large",
                "parent.png",
            )
            for name in ("higgs-tiny", "higgs-small", "higgs-medium"):  # nested variants
                assert name in body
            assert "Study report of" in body
            body = visit(
                f"/experiments/{exp.experiment_id}/runs/{child.info.run_id}",
                "best/val/loss",
                "run.png",
            )
            verdict = child.data.tags["fitscope.verdict"]
            assert f"higgs-large (debug profile): {verdict}" in body
            assert f"Selected epoch {selected}" in body
            assert f"{trained['best_val_loss']}"[:8] in body  # best/val/loss, selected epoch
            body = visit(  # MLflow's system metrics, sampled while it trained
                f"/experiments/{exp.experiment_id}/runs/{child.info.run_id}/system-metrics",
                "cpu_utilization_percentage",
                "system_metrics.png",
            )
            assert "System metrics" in body
            body = visit(
                f"/experiments/{exp.experiment_id}/models/{model_id}", "val/loss", "model.png"
            )
            rows = body.split("val/loss", 1)[1].splitlines()
            value = float(next(line for line in rows if line.strip().startswith("0.")))
            assert value == pytest.approx(trained["best_val_loss"], abs=1e-6)  # not step 0's
            body = visit(
                f"/models/fitscope-higgs/versions/{version.version}",
                "fitscope.verdict",
                "version.png",
            )
            for key in ("fitscope.profile", "fitscope.commit", "fitscope.variant", "test/acc"):
                assert key in body
            assert "@debug" in body or "debug" in body
            browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
