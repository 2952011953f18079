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
    # data.dvc is not a dependency of any stage: a fresh clone without its data still runs.
    status = run(["dvc", "status", "split_higgs", "split_mnist"], repo_copy)
    assert "changed" not in status.stdout


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
