"""Experiments side by side the way DVC supports it: `dvc exp run --queue` + `dvc queue start`."""

from __future__ import annotations

import functools
import json
import subprocess
import time

import psutil
import pytest
import yaml
from conftest import run, venv_env

from fitscope.tracking.store import get_client


def queue_workers(repo) -> list[psutil.Process]:
    """This repository's `dvc exp queue-worker` processes."""
    found = []
    for proc in psutil.process_iter(["cmdline", "cwd"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "queue-worker" in cmdline and proc.info["cwd"] == str(repo):
            found.append(proc)
    return found


@pytest.mark.slow
def test_queued_experiments_run_side_by_side_into_the_workspace_store(repo_copy):
    # Long enough (about 12 s of training on an idle core) for the runs to overlap.
    overrides = (
        "+experiment=higgs_capacity model=tiny trainer.max_epochs=500"
        " callbacks.early_stopping.patience=500"
    )
    # One HIGGS variant (stage train@higgs trains them all), committed: queued
    # experiments start from the commit.
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["variants"]["higgs"] = {"higgs-tiny": params["variants"]["higgs"]["higgs-tiny"]}
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "commit", "-qam", "one HIGGS variant"], repo_copy)
    for name, seeds in (("tiny-s0", "0"), ("tiny-s1", "1")):
        run(
            [
                *("dvc", "exp", "run", "--queue", "train@higgs", "-n", name),
                *("-S", "study.profile=debug", "-S", f"study.seeds='{seeds}'"),
                *("-S", f"variants.higgs.higgs-tiny.overrides='{overrides}'"),
            ],
            repo_copy,
        )
    # As from a terminal: with pipes, `dvc queue start` would wait for its workers, which
    # inherit them. The second worker starts once the first experiment runs, as
    # docs/pipeline.md advises: two workers setting up or cleaning up at the same moment
    # can fail a task on git's packed-refs lock (DVC issue #10673).
    start_worker = functools.partial(
        subprocess.run,
        cwd=repo_copy,
        env=venv_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )
    start_worker(["dvc", "queue", "start"])
    deadline = time.monotonic() + 120
    while "Running" not in run(["dvc", "queue", "status"], repo_copy).stdout:
        assert time.monotonic() < deadline, "the first queued experiment never started"
        time.sleep(1)
    start_worker(["dvc", "queue", "start", "-j", "2"])
    seen: dict[int, psutil.Process] = {}  # every worker seen, to be sure all are gone at the end
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            seen.update({p.pid: p for p in queue_workers(repo_copy)})
            status = run(["dvc", "queue", "status"], repo_copy).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
        if status.count("Success") != 2:
            # DVC keeps no stage log for a task that failed before its stage ran; the
            # celery workers' own logs say why.
            workers = sorted((repo_copy / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.out"))
            logs = [p.read_text(errors="replace")[-3000:] for p in workers]
            for name in ("tiny-s0", "tiny-s1"):  # the stage output, when a stage ran
                shown = subprocess.run(
                    ["dvc", "queue", "logs", name],
                    cwd=repo_copy,
                    env=venv_env(),
                    capture_output=True,
                    text=True,
                )
                logs.append(f"{name}: {shown.stdout[-3000:]}{shown.stderr[-500:]}")
            pytest.fail(status + "\n" + "\n----\n".join(logs))
        assert seen, "no `dvc exp queue-worker` process was seen"
    finally:
        run(["dvc", "queue", "stop"], repo_copy)
        seen.update({p.pid: p for p in queue_workers(repo_copy)})
        _, alive = psutil.wait_procs(list(seen.values()), timeout=60)
        for proc in alive:  # stopped by PID if `dvc queue stop` did not end them
            proc.kill()
        assert not alive, f"queue workers still running after `dvc queue stop`: {alive}"

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo_copy).stdout)
    names = {exp["name"] for rev in shown for exp in (rev.get("experiments") or [])}
    assert {"tiny-s0", "tiny-s1"} <= names
    # Both temporary workspaces logged into the workspace's own store (DVC_ROOT).
    client = get_client(f"sqlite:///{repo_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("higgs_capacity")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("fitscope.role") != "parent"]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    a, b = children  # side by side: the two runs overlapped in time
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
