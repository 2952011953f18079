"""Files and parameters are data, never code: pickles, shell text and paths are refused."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO, last_error_line, run, run_train

from fitscope.core.errors import FitscopeError
from fitscope.pipeline.stages import train_sweep
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import tag_equals


class _Payload:
    """Unpickling this runs a shell command (what a crafted model.pt could do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def fitscope(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "fitscope.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_a_crafted_model_file_runs_nothing_and_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "runs" / "higgs" / "evil" / "0"
    run_dir.mkdir(parents=True)
    torch.save({"state_dict": _Payload(marker), "config": {}}, run_dir / "model.pt")
    (run_dir / "metrics.json").write_text("{}")
    # The payload is live: the unsafe loader would run it.
    torch.load(run_dir / "model.pt", weights_only=False)
    assert marker.exists()
    marker.unlink()

    # The evaluate stage reads the test metrics the training job wrote (plain JSON); it
    # never unpickles a model file, so the payload cannot run.
    proc = fitscope(["evaluate", "higgs"], tmp_path)
    line = last_error_line(proc, 2)
    assert line.startswith("fitscope: error: runs/higgs/evil/0/metrics.json has no test metrics")
    assert "Fix: retrain it" in line
    assert not marker.exists()
    assert not (tmp_path / "metrics").exists()


def test_no_source_file_unpickles_with_weights_only_false():
    """Every ``torch.load`` in src/ passes ``weights_only=True``: tensors and plain
    containers only, so no file handed to fitscope can run code when it is read."""
    calls = []
    for path in sorted((REPO / "src").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                weights_only = [k for k in node.keywords if k.arg == "weights_only"]
                safe = weights_only and ast.unparse(weights_only[0].value) == "True"
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", bool(safe)))
    assert calls, "no torch.load found: the check would pass vacuously"
    assert [where for where, safe in calls if not safe] == []


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_a_file_planted_in_the_run_dir_is_never_unpickled(processed_dir, tmp_path, mlflow_uri):
    """The DDP callbacks' state file (.ddp_callbacks.pt) is read back only by the DDP fit
    that wrote it: one planted in a run directory (a DVC-tracked output a user may hand
    over) is removed before the fit and never loaded."""
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    planted = run_dir / ".ddp_callbacks.pt"
    torch.save({"history": _Payload(marker)}, planted)
    args = ["trainer=debug", f"paths.data_dir={processed_dir}", f"paths.run_dir={run_dir}"]
    proc = run_train([*args, "study=t_planted"], tmp_path, mlflow_uri)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not marker.exists()
    assert not planted.exists() and (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("variant", ["../../x", "/etc", "a/b", ".hidden"])
def test_variant_names_that_leave_their_folder_are_refused(variant, tmp_path):
    proc = fitscope(["evaluate", variant], tmp_path)
    assert f"dataset={variant!r} is not a valid name" in last_error_line(proc, 2)


def test_overrides_from_params_are_split_without_a_shell_and_parsed_by_hydra():
    params = {
        "study": {"profile": "debug", "seeds": "0,1"},
        "variants": {"g": {"v1": {"study": "s", "overrides": "model=tiny 'study=a b'"}}},
    }
    overrides, jobs = train_sweep(params, "g")
    assert jobs == [["model=tiny", "study=a b", "study=s", "variant=v1"]]
    assert "seed=0,1" in overrides
    params["variants"]["g"]["v1"]["overrides"] = "model=tiny $(touch x)"
    with pytest.raises(
        FitscopeError, match=r"^variants\.g\.v1\.overrides: cannot parse override '\$\(touch'"
    ):
        train_sweep(params, "g")


@pytest.mark.slow
def test_shell_text_in_a_params_override_is_never_executed_by_dvc(repo_copy, tmp_path):
    marker = tmp_path / "pwned"
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["variants"] = {
        "higgs": {
            "evil": {
                "study": "higgs_capacity",
                # Inside double quotes a shell still runs $(...): the old stage command did.
                "overrides": f'+experiment=higgs_capacity model=tiny "study=$(touch {marker})"',
            }
        }
    }
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params))
    run(["dvc", "repro", "split_higgs"], repo_copy)
    proc = subprocess.run(
        ["dvc", "repro", "-s", "train@higgs"],
        cwd=repo_copy,
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"},
    )
    assert proc.returncode != 0
    error = "fitscope: error: variants.higgs.evil.overrides: cannot parse override 'study=$(touch"
    assert error in proc.stdout + proc.stderr
    assert not marker.exists()


@pytest.mark.parametrize("value", ["plain-key", "it's", 'say "hi"', "a'b or 1=1"])
def test_tag_values_in_mlflow_filters_match_exactly(value, mlflow_uri):
    """A quote in a value never breaks (or widens) an MLflow search."""

    client = get_client(mlflow_uri)
    exp_id = ensure_experiment(client, "t_filter")
    wanted = client.create_run(exp_id, tags={"fitscope.parent_key": value}).info.run_id
    client.create_run(exp_id, tags={"fitscope.parent_key": "other"})
    found = client.search_runs([exp_id], tag_equals("fitscope.parent_key", value))
    assert [r.info.run_id for r in found] == [wanted]


@pytest.mark.parametrize("value", ["a'b\"c", "back\\slash", "tick`"])
def test_tag_values_that_cannot_be_quoted_are_refused(value):

    with pytest.raises(FitscopeError, match="cannot search MLflow for the tag value"):
        tag_equals("fitscope.parent_key", value)
