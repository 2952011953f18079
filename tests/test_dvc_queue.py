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

from fitscope.pipeline.diagnostics import drop_diagnostics
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
    """The README's side-by-side workflow, whole pipeline (report stage included), two
    workers: each temporary copy logs, and registers its champions, into the workspace's
    store (DVC_ROOT), and no copy grows an `mlflow.db` of its own."""
    # Long enough (about 12 s of training on an idle core) for the runs to overlap.
    overrides = (
        "+experiment=higgs_capacity model=tiny trainer.max_epochs=500"
        " callbacks.early_stopping.patience=500"
    )
    # One variant per dataset (each train stage trains its dataset's variants), committed:
    # queued experiments start from the commit.
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["variants"] = {
        "higgs": {"higgs-tiny": params["variants"]["higgs"]["higgs-tiny"]},
        "mnist": {"mnist-none": params["variants"]["mnist"]["mnist-none"]},
    }
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    drop_diagnostics(repo_copy)  # they train variants this copy no longer has
    run(["git", "commit", "-qam", "one variant per dataset"], repo_copy)
    names = ("tiny-s0", "tiny-s1")
    for name, seeds in zip(names, ("0", "1"), strict=True):
        run(
            [
                *("dvc", "exp", "run", "--queue", "-n", name),
                *("-S", "study.profile=debug", "-S", "study.jobs=1"),
                *("-S", f"study.seeds='{seeds}'"),
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
    stray: set[str] = set()  # MLflow stores inside DVC's temporary copies (there must be none)
    try:
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            seen.update({p.pid: p for p in queue_workers(repo_copy)})
            stray |= {str(p) for p in (repo_copy / ".dvc/tmp/exps").rglob("mlflow.db*")}
            status = run(["dvc", "queue", "status"], repo_copy).stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
        if status.count("Success") != 2:
            # DVC keeps no stage log for a task that failed before its stage ran; the
            # celery workers' own logs say why.
            workers = sorted((repo_copy / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.out"))
            logs = [p.read_text(errors="replace")[-3000:] for p in workers]
            for name in names:  # the stage output, when a stage ran
                shown = subprocess.run(
                    ["dvc", "queue", "logs", name],
                    cwd=repo_copy,
                    env=venv_env(),
                    capture_output=True,
                    text=True,
                )
                logs.append(f"{name}: {shown.stdout[-3000:]}{shown.stderr[-500:]}")
            pytest.fail(f"{status}\nstray stores: {sorted(stray)}\n" + "\n----\n".join(logs))
        assert seen, "no `dvc exp queue-worker` process was seen"
    finally:
        run(["dvc", "queue", "stop"], repo_copy)
        seen.update({p.pid: p for p in queue_workers(repo_copy)})
        _, alive = psutil.wait_procs(list(seen.values()), timeout=60)
        for proc in alive:  # stopped by PID if `dvc queue stop` did not end them
            proc.kill()
        assert not alive, f"queue workers still running after `dvc queue stop`: {alive}"
    assert not stray, f"MLflow stores inside DVC's temporary copies: {sorted(stray)}"

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo_copy).stdout)
    revs = {exp["name"]: exp["revs"][0]["rev"] for rev in shown for exp in rev["experiments"] or []}
    assert set(names) <= set(revs)
    versions = set()
    for name in names:  # each experiment has its report, its champions registered
        report = run(["git", "show", f"{revs[name]}:reports/study.md"], repo_copy).stdout
        assert "(debug profile)" in report
        for dataset, variant in (("higgs", "higgs-tiny"), ("mnist", "mnist-none")):
            # The second to report moves @debug only if it beats the first (the gate).
            (line,) = [x for x in report.splitlines() if f"models:/fitscope-{dataset}@debug" in x]
            assert f"{variant} (version " in line, report
            versions.add(line.split(f"{variant} (version ")[1].split(")")[0] + dataset)
    assert versions == {"1higgs", "2higgs", "1mnist", "2mnist"}
    # Both temporary workspaces logged into the workspace's own store (DVC_ROOT).
    client = get_client(f"sqlite:///{repo_copy / 'mlflow.db'}")
    exp = client.get_experiment_by_name("higgs_capacity")
    runs = client.search_runs([exp.experiment_id])
    children = [r for r in runs if r.data.tags.get("fitscope.role") != "parent"]
    assert sorted(r.data.params["seed"] for r in children) == ["0", "1"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    a, b = children  # side by side: the two runs overlapped in time
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time
    # ... and registered their champions there: one version per experiment and dataset.
    for dataset in ("higgs", "mnist"):
        registered = client.search_model_versions(f"name = 'fitscope-{dataset}'")
        assert sorted(str(v.version) for v in registered) == ["1", "2"]
        assert len({v.run_id for v in registered}) == 2
