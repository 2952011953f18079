"""A DVC train stage interrupted with Ctrl-C resumes when run again with nothing changed
(finished jobs skipped, interrupted ones continued from their checkpoints), and trains
everything anew after a change to its code (docs/pipeline.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
import yaml
from conftest import run, runs_of, venv_env

from fitscope.pipeline.lifecycle import RESUME_HINT
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import CONFIG_HASH_TAG, PARENT_TAG

pytestmark = pytest.mark.slow

LARGE = (
    "+experiment=higgs_capacity model=large trainer.max_epochs=60"
    " callbacks.early_stopping.enabled=false callbacks.checkpoint.every_epochs=1"
    " logger.log_model=false"
)


def finished_per_parent_and_config(client) -> Counter:
    _, children = runs_of(client, "higgs_capacity")
    return Counter(
        (r.data.tags[PARENT_TAG], r.data.tags[CONFIG_HASH_TAG])
        for r in children
        if r.info.status == "FINISHED"
    )


def test_an_interrupted_train_stage_resumes_and_a_changed_one_retrains(repo_copy):
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    # Side by side (the longest, large, starts first): tiny ends while large trains.
    params["study"].update(profile="debug", seeds="0", jobs=2)
    tiny = params["variants"]["higgs"]["higgs-tiny"]
    params["variants"]["higgs"] = {
        "higgs-tiny": tiny,
        "higgs-large": {"study": "higgs_capacity", "overrides": LARGE},
    }
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro", "split_higgs"], repo_copy)

    # Ctrl-C (SIGINT to the terminal's process group) once tiny has finished and large
    # has written a checkpoint.
    log = repo_copy / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            ["dvc", "repro", "-s", "train@higgs"],
            cwd=repo_copy,
            env=venv_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tiny_metrics = repo_copy / "runs/higgs/higgs-tiny/0/metrics.json"
    deadline = time.monotonic() + 300
    while not (tiny_metrics.is_file() and list(repo_copy.glob("checkpoints/*/*/last.ckpt"))):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(120) != 0
    assert "interrupted at epoch" in log.read_text() and RESUME_HINT in log.read_text()
    kept = json.loads(tiny_metrics.read_text())
    tiny_files = {p.name: p.read_bytes() for p in tiny_metrics.parent.iterdir() if p.is_file()}

    again = run(["dvc", "repro", "-s", "train@higgs"], repo_copy)
    output = again.stdout + again.stderr
    assert "skipping higgs-tiny: run" in output, output
    assert "resuming higgs-large from" in output, output
    # Not retrained: DVC deleted runs/higgs, the files came back from its MLflow run.
    assert "higgs-tiny: run " in output and "files restored into" in output, output
    assert json.loads(tiny_metrics.read_text()) == kept
    for name in ("history.csv", "model.pt", "learning_curves.png"):
        assert (tiny_metrics.parent / name).read_bytes() == tiny_files[name], name
    client = get_client(f"sqlite:///{repo_copy / 'mlflow.db'}")
    first = finished_per_parent_and_config(client)
    assert len(first) == 2 and set(first.values()) == {1}, first
    _, children = runs_of(client, "higgs_capacity")
    large = [r for r in children if r.data.tags["fitscope.variant"] == "higgs-large"]
    assert [r.info.status for r in large] == ["FINISHED"]  # the interrupted run, continued
    assert "fitscope.resumed" in large[0].data.tags

    # A change to the stage's code: DVC re-runs it and everything trains anew, under a
    # parent of its own.
    with (repo_copy / "src/fitscope/training/fit.py").open("a") as fh:
        fh.write("\n# a change to the training code\n")
    # Without the suite's OMP_NUM_THREADS=1 (tests/conftest.py): a cap the user sets is
    # kept, so only then do the last jobs take the idle cores.
    env = {k: v for k, v in venv_env().items() if k != "OMP_NUM_THREADS"}
    third = subprocess.run(
        ["dvc", "repro", "-s", "train@higgs"],
        cwd=repo_copy,
        env=env,
        capture_output=True,
        text=True,
    )
    assert third.returncode == 0, third.stdout + third.stderr
    output = third.stdout + third.stderr
    assert "skipping" not in output and "resuming" not in output, output
    assert json.loads(tiny_metrics.read_text())["mlflow_run_id"] != kept["mlflow_run_id"]
    # Side by side, one thread each; once tiny had finished, large took the idle core.
    large_metrics = json.loads((repo_copy / "runs/higgs/higgs-large/0/metrics.json").read_text())
    cores = len(os.sched_getaffinity(0))
    assert large_metrics["num_threads"] == cores // 2
    assert large_metrics["num_threads_at_end"] == cores
    after = finished_per_parent_and_config(client)
    assert len(after) == 4 and set(after.values()) == {1}, after
    assert len({parent for parent, _ in after}) == 2
    assert run(["dvc", "status", "train@higgs"], repo_copy).stdout.strip().endswith("up to date.")
