"""`dvc repro` end to end on a fresh copy of the repository (embedded sources)."""

from __future__ import annotations

import json

import pytest
from conftest import run

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
    the workspace)."""
    from conftest import make_repo_copy

    repo = make_repo_copy(tmp_path_factory.mktemp("study") / "repo")
    proc = run(["dvc", "exp", "run", "-S", "study.profile=debug"], repo)
    assert "Experiment results have been applied to your workspace." in proc.stdout
    return repo, proc.stdout


def test_full_pipeline_runs_every_stage(study_repo):
    import yaml

    repo, out = study_repo
    variants = yaml.safe_load((repo / "params.yaml").read_text())["variants"]
    assert len(variants) == 13
    for name in variants:
        assert f"Running stage 'train@{name}'" in out
        assert f"Running stage 'evaluate@{name}'" in out
    assert "Running stage 'report'" in out
    report = (repo / "reports" / "study.md").read_text()
    assert "debug profile" in report
    for name in variants:
        assert f"| {name} |" in report


def test_report_numbers_match_metrics_files_and_mlflow(study_repo):
    from fitscope.tracking import get_client

    repo, _ = study_repo
    report = (repo / "reports" / "study.md").read_text()
    client = get_client(f"sqlite:///{repo / 'mlflow.db'}")
    for name in ("higgs-tiny", "higgs-combined", "mnist-wd"):
        test = json.loads((repo / "metrics" / f"{name}.json").read_text())
        train = json.loads((repo / "runs" / name / "0" / "metrics.json").read_text())
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


def test_champion_alias_loads_and_predicts(study_repo):
    import mlflow
    import numpy as np

    repo, _ = study_repo
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/fitscope-higgs@champion")
    x = np.load(repo / "data/processed/higgs/test_x.npy")[:10]
    probs = np.asarray(model.predict(x))
    assert probs.shape == (10, 1) and ((probs >= 0) & (probs <= 1)).all()


def test_metrics_and_plots_commands_read_the_outputs(study_repo):
    repo, _ = study_repo
    shown = run(["dvc", "metrics", "show", "--json"], repo).stdout
    data = json.loads(shown)
    files = next(iter(data.values()))["data"]
    assert files["metrics/higgs-tiny.json"]["data"]["seeds"] == 1
    plots = run(["dvc", "plots", "show", "-o", "plots_out"], repo)
    assert (repo / "plots_out" / "index.html").exists(), plots.stdout


def test_second_repro_is_a_noop_and_one_change_reruns_only_its_chain(study_repo):
    repo, _ = study_repo
    again = run(["dvc", "repro"], repo).stdout
    assert "Running stage" not in again and "Data and pipelines are up to date." in again
    set_param(repo, "variants.mnist-augment.overrides", lambda o: f"{o} optimizer.lr=0.02")
    changed = run(["dvc", "repro"], repo).stdout
    ran = sorted(
        line.split("'")[1] for line in changed.splitlines() if line.startswith("Running stage")
    )
    assert ran == ["evaluate@mnist-augment", "report", "train@mnist-augment"]


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
        assert (repo / "search" / "reports" / study / "best_so_far.png").exists()
    # The main pipeline neither runs nor depends on it.
    assert "Running stage" not in run(["dvc", "repro"], repo).stdout
