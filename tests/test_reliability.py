"""Interrupts, crashes and races: real processes, real signals, the real SQLite MLflow store.

Every fault in docs/reliability.md ("Interrupts, crashes and races") has its test here.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import last_error_line, run_train, runs_of
from mlflow.entities import ViewType

from fitscope.cli import main
from fitscope.core.errors import FitscopeError
from fitscope.core.process import Owner
from fitscope.pipeline.lifecycle import ENTRY_ENV, RESUME_HINT, JobGuard, received
from fitscope.tracking import liveness
from fitscope.tracking.claims import claim_run
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.liveness import Heartbeats, owner_tags, run_owner
from fitscope.tracking.store import (
    HEARTBEAT_ENV,
    STALE_AFTER_ENV,
    STALE_AFTER_S,
    env_seconds,
    get_client,
)
from fitscope.tracking.tags import CONFIG_HASH_TAG, HEARTBEAT_TAG, PARENT_ENV

# Long enough to be interrupted mid-training (a few seconds of epochs after the first one is
# logged), short enough that the re-run of the same command completes quickly.
TRAINING = [
    "model=large",
    "data.train_size=2000",
    "trainer.max_epochs=40",
    "callbacks.early_stopping.enabled=false",
    "logger.flush_every=1",  # every epoch reaches MLflow: the tests poll for it
    "logger.log_model=false",
    "progress=false",  # stderr holds the interrupt's one line and nothing else
]
SWEEP = ["-m", "optimizer.lr=0.001,0.002", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
HINT = re.escape(RESUME_HINT)
INTERRUPTED = re.compile(rf"fitscope: interrupted at epoch (\d+); {HINT}")


class Train:
    """``python -m fitscope.train ARGS`` in its own session (process group), output in files."""

    def __init__(self, args: list[str], cwd: Path, uri: str, name: str) -> None:
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        env.pop(PARENT_ENV, None)
        self.out, self.err = cwd / f"{name}.out", cwd / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fitscope.train", *args],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=err,
                start_new_session=True,  # like a shell job: Ctrl-C goes to the whole group
            )
        self.pid = self.proc.pid

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        code = self.proc.wait(timeout)
        return subprocess.CompletedProcess(
            self.proc.args, code, self.out.read_text(), self.err.read_text()
        )

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()


def wait_until_training(client, study: str, train: Train, runs: int, timeout: float = 240):
    """Poll the store until ``runs`` RUNNING child runs have logged an epoch; return them."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if train.proc.poll() is not None:
            pytest.fail(f"training ended early ({train.proc.returncode}):\n{train.output()}")
        exp = client.get_experiment_by_name(study)
        if exp is not None:
            running = [
                r
                for r in client.search_runs(
                    [exp.experiment_id], filter_string="attributes.status = 'RUNNING'"
                )
                if r.data.tags.get("fitscope.role") != "parent" and "val/loss" in r.data.metrics
            ]
            if len(running) >= runs:
                return running
        time.sleep(0.3)
    pytest.fail(f"no epoch logged in {timeout} s:\n{train.output()}")


def by_status(runs) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    return counts


def finished_per_config(children) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in children:
        if run.info.status == "FINISHED":
            chash = run.data.tags[CONFIG_HASH_TAG]
            counts[chash] = counts.get(chash, 0) + 1
    return counts


@pytest.mark.slow
def test_single_run_interrupted_killed_and_rerun_trains_once(processed_dir, tmp_path, mlflow_uri):
    args = [f"paths.data_dir={processed_dir}", "study=t_signals", *TRAINING]
    client = get_client()
    for signum, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        run = Train(args, tmp_path, mlflow_uri, signal.Signals(signum).name)
        (running,) = wait_until_training(client, "t_signals", run, 1)
        os.killpg(run.pid, signum)  # Ctrl-C / `kill`
        proc = run.wait(60)
        match = INTERRUPTED.fullmatch(last_error_line(proc, code))
        assert match and proc.stderr.count("\n") == 1, proc.stderr  # one line, nothing else
        epoch = int(match.group(1))
        killed = client.get_run(running.info.run_id)
        assert killed.info.status == "KILLED"
        reason = killed.data.tags["fitscope.failure"]
        assert reason == f"interrupted ({signal.Signals(signum).name}) at epoch {epoch}"
        logged = len(client.get_metric_history(running.info.run_id, "val/loss"))
        assert epoch >= 1 and epoch <= logged <= epoch + 1  # the epoch in progress (0-based)

    # kill -9 (or OOM, power loss): nothing can close the run; the next command does.
    run = Train(args, tmp_path, mlflow_uri, "SIGKILL")
    (orphan,) = wait_until_training(client, "t_signals", run, 1)
    run.proc.kill()
    assert run.wait(60).returncode == -signal.SIGKILL
    assert client.get_run(orphan.info.run_id).info.status == "RUNNING"

    proc = run_train(args, tmp_path, mlflow_uri)  # the same command again
    assert proc.returncode == 0, proc.stderr
    assert (
        f"run {orphan.info.run_id} (higgs-large) was left RUNNING: now KILLED, its process "
        f"(pid {run.pid} on host {socket.gethostname()}) is gone"
    ) in proc.stdout
    reconciled = client.get_run(orphan.info.run_id)
    assert reconciled.info.status == "KILLED"
    assert reconciled.data.tags["fitscope.failure"].startswith("reconciled: its process")
    assert reconciled.data.tags["fitscope.reconciled"]
    _, children = runs_of(client, "t_signals")
    assert by_status(children) == {"KILLED": 3, "FINISHED": 1}
    assert len({c.data.tags[CONFIG_HASH_TAG] for c in children}) == 1


@pytest.mark.slow
def test_joblib_sweep_interrupted_killed_orphans_stop_and_rerun_trains_once(
    processed_dir, tmp_path, mlflow_uri
):
    args = [*SWEEP, f"paths.data_dir={processed_dir}", "study=t_sweep_signals", *TRAINING]
    client = get_client()
    seen: set[str] = set()

    def new_runs():
        parents, children = runs_of(client, "t_sweep_signals")
        fresh = [c for c in children if c.info.run_id not in seen]
        seen.update(c.info.run_id for c in fresh)
        return parents, fresh

    # Ctrl-C reaches the whole process group (main + loky workers); `kill` only the main.
    for signum, to_group in ((signal.SIGINT, True), (signal.SIGTERM, False)):
        name = signal.Signals(signum).name
        sweep = Train(args, tmp_path, mlflow_uri, f"sweep-{name}")
        wait_until_training(client, "t_sweep_signals", sweep, 2)
        (os.killpg if to_group else os.kill)(sweep.pid, signum)
        proc = sweep.wait(120)
        line = last_error_line(proc, 128 + signum)
        assert proc.stderr.count("\n") == 1, proc.stderr
        assert re.fullmatch(
            rf"fitscope: interrupted \({name}\); runs KILLED: job \d higgs-large at epoch \d+, "
            rf"job \d higgs-large at epoch \d+; {HINT}",
            line,
        ), line
        parents, children = new_runs()
        assert len(parents) == 1 and parents[0].info.status == "KILLED"
        assert parents[0].data.tags["fitscope.failure"] == "the sweep was interrupted"
        assert by_status(children) == {"KILLED": 2}
        for child in children:
            assert child.data.tags["fitscope.failure"].startswith(f"interrupted ({name}) at epoch")

    # kill -9 of the sweep's main process: its workers end their runs and exit by themselves.
    sweep = Train(args, tmp_path, mlflow_uri, "sweep-SIGKILL")
    wait_until_training(client, "t_sweep_signals", sweep, 2)
    workers = psutil.Process(sweep.pid).children()
    assert len(workers) >= 2
    sweep.proc.kill()
    killed_at = time.monotonic()
    sweep.wait(30)
    _, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, f"workers outlived their sweep: {alive}"
    assert time.monotonic() - killed_at < 15  # ~1 s to notice, then the job ends its run
    parents, children = new_runs()
    assert parents[0].info.status == "RUNNING"  # its owner died: the next command reconciles it
    assert by_status(children) == {"KILLED": 2}
    for child in children:
        assert child.data.tags["fitscope.failure"].startswith("interrupted (SIGTERM) at epoch")

    # The same sweep, started twice at once: each config trains once, in one of them; the
    # other skips it with one line and exits 0.
    first = Train(args, tmp_path, mlflow_uri, "rerun-a")
    second = Train(args, tmp_path, mlflow_uri, "rerun-b")
    procs = [first.wait(300), second.wait(300)]
    assert [p.returncode for p in procs] == [0, 0], [p.stderr for p in procs]
    skipped = re.findall(
        r"skipping higgs-large: already running in pid (\d+) on host (\S+) \(MLflow run \w+\)",
        "".join(p.stdout for p in procs),
    )
    assert len(skipped) == 2, [p.stdout for p in procs]
    parents, children = runs_of(client, "t_sweep_signals")
    assert [p.info.status for p in parents] == ["FINISHED"]
    assert "fitscope.failure" not in parents[0].data.tags
    assert by_status(children) == {"KILLED": 6, "FINISHED": 2}
    assert sorted(finished_per_config(children).values()) == [1, 1]
    everything = client.search_runs([parents[0].info.experiment_id], run_view_type=ViewType.ALL)
    assert not [r for r in everything if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_sweep_that_raises_after_its_parent_exists_closes_it(processed_dir, tmp_path, mlflow_uri):
    """Hydra skips on_multirun_end when the sweep raises: fitscope-train closes the parent.

    (A bad job config no longer gets this far: every job is validated before the parent
    exists, tests/test_schema.py. A launcher that fails after it does is the case here.)
    """
    proc = run_train(
        [
            "-m",
            f"paths.data_dir={processed_dir}",
            "trainer=debug",
            "study=t_badjob",
            "logger.log_model=false",
            "model=tiny,small",
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=0",  # joblib refuses it when the launch starts
        ],
        tmp_path,
        mlflow_uri,
    )
    assert proc.returncode != 0
    parents, children = runs_of(get_client(), "t_badjob")
    assert [p.info.status for p in parents] == ["FAILED"]
    assert parents[0].data.tags["fitscope.failure"] == "the sweep failed (see its output)"
    assert children == []


def _dead_owner() -> Owner:
    """A real process, killed with SIGKILL and reaped."""
    proc = subprocess.Popen(["sleep", "60"])
    owner = Owner(socket.gethostname(), proc.pid, psutil.Process(proc.pid).create_time())
    proc.kill()
    proc.wait()
    return owner


def _open_run(client, exp_id: str, name: str, owner: Owner, **tags: str) -> str:
    run_tags = {CONFIG_HASH_TAG: name, **owner_tags(owner), **tags}
    return client.create_run(exp_id, run_name=name, tags=run_tags).info.run_id


@pytest.mark.slow
def test_runs_reconcile_kills_only_runs_whose_owner_is_gone(tmp_path, mlflow_uri, capsys):
    client = get_client()
    exp_id = ensure_experiment(client, "t_reconcile")
    me = Owner.current()
    dead = _open_run(client, exp_id, "dead", _dead_owner())
    reused = _open_run(client, exp_id, "reused", Owner(me.host, me.pid, me.started - 5))
    live = _open_run(client, exp_id, "live", me)
    far = Owner("elsewhere.invalid", 4242, 1.0)
    silent = _open_run(client, exp_id, "silent", far)
    client.set_tag(silent, HEARTBEAT_TAG, f"{time.time() - 900:.3f}")
    beating = _open_run(client, exp_id, "beating", far)
    foreign = client.create_run(exp_id, run_name="not-fitscope").info.run_id

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri}
    proc = subprocess.run(
        [sys.executable, "-m", "fitscope.cli", "runs", "reconcile", "--stale-after", "600"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    *changes, summary = proc.stdout.strip().splitlines()
    assert summary == "reconciled 2 experiment(s): 3 run(s) KILLED, 3 still RUNNING"
    by_run = {line.split()[1]: line for line in changes}
    assert sorted(by_run) == sorted([dead, reused, silent])
    host = re.escape(socket.gethostname())
    assert re.fullmatch(
        rf"KILLED {dead} t_reconcile/dead: its process \(pid \d+ on host {host}\) is gone",
        by_run[dead],
    )
    assert by_run[reused] == (
        f"KILLED {reused} t_reconcile/reused: its process (pid {me.pid} on host {me.host}) is gone"
    )
    assert re.fullmatch(
        rf"KILLED {silent} t_reconcile/silent: no heartbeat from host elsewhere.invalid for "
        r"9\d\d s \(stale after 600 s\)",
        by_run[silent],
    )
    for run_id in (dead, reused, silent):
        run = client.get_run(run_id)
        assert run.info.status == "KILLED"
        assert run.data.tags["fitscope.failure"].startswith("reconciled: ")
        assert " by pid " in run.data.tags["fitscope.reconciled"]
    for run_id in (live, beating, foreign):
        assert client.get_run(run_id).info.status == "RUNNING"

    with pytest.raises(SystemExit) as exit_info:
        main(["runs", "reconcile", "--experiment", "nope"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        f"fitscope: error: no MLflow experiment named 'nope' in {mlflow_uri}. Fix: check the "
        "name (`mlflow experiments search`), or leave --experiment out\n"
    )


def _claim(uri: str, barrier, results) -> None:
    client = get_client(uri)
    exp_id = ensure_experiment(client, "t_claim")
    barrier.wait()  # both claim at the same instant
    claim = claim_run(client, exp_id, "c0ffee", "race", {"x": 1}, {}, settle_s=1.0, exact=False)
    if claim.tracker is not None:
        claim.tracker.finish()
        results.put(("won", claim.tracker.run_id))
    else:
        results.put(("lost", (claim.holder or claim.finished).info.run_id))


@pytest.mark.slow
def test_two_processes_claiming_one_config_at_once_train_it_once(tmp_path):
    # The shared-store protocol (no file lock: settle, list, earliest claim wins). The
    # SQLite lock path is raced by the two identical sweeps above.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    get_client(uri)  # the store exists before the race
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(uri, barrier, results)) for _ in range(2)]
    for proc in procs:
        proc.start()
    outcomes = sorted(results.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(30)
    (lost, loser_saw), (won, winner) = outcomes
    assert (lost, won) == ("lost", "won") and loser_saw == winner
    client = get_client(uri)
    exp_id = client.get_experiment_by_name("t_claim").experiment_id
    assert [r.info.run_id for r in client.search_runs([exp_id])] == [winner]
    # Had the loser created its claim before it saw the winner's, it withdrew it.
    for withdrawn in client.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY):
        assert withdrawn.info.status == "KILLED"
        assert withdrawn.data.tags["fitscope.claim_lost_to"] == winner


def test_a_claim_that_sees_an_earlier_rival_after_settling_withdraws(tmp_path, mlflow_uri):
    # The shared-store protocol when the rival's claim lands during our settle time: a
    # job on another host whose clock is 2 s behind, say (settle time > clock skew).
    import threading

    client = get_client()
    exp_id = ensure_experiment(client, "t_withdraw")
    far = Owner("elsewhere.invalid", 4242, 1.0)
    rival: list[str] = []

    def rival_claims_once_ours_exists() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ours = client.search_runs([exp_id], filter_string="attributes.status = 'RUNNING'")
            if ours:
                tags = {CONFIG_HASH_TAG: "feed", **owner_tags(far)}
                start = ours[0].info.start_time - 2000
                rival.append(client.create_run(exp_id, start, tags, "rival").info.run_id)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=rival_claims_once_ours_exists)
    thread.start()
    claim = claim_run(client, exp_id, "feed", "ours", {}, {}, settle_s=2.0, exact=False)
    thread.join()
    assert claim.tracker is None and claim.holder.info.run_id == rival[0]
    assert run_owner(claim.holder) == far
    (withdrawn,) = client.search_runs([exp_id], run_view_type=ViewType.DELETED_ONLY)
    assert withdrawn.info.status == "KILLED"
    assert withdrawn.data.tags["fitscope.claim_lost_to"] == rival[0]
    assert [r.info.run_id for r in client.search_runs([exp_id])] == rival


def test_an_interrupt_in_a_plain_process_does_not_stop_its_next_job(monkeypatch):
    monkeypatch.delenv(ENTRY_ENV, raising=False)
    # A plain process: Python's own Ctrl-C handler. (An earlier in-process test in this
    # worker may have left SIG_IGN: Lightning ignores SIGINT after an interrupted fit.)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_then_next_job()
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_then_next_job() -> None:
    with pytest.raises(KeyboardInterrupt), JobGuard():
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in a notebook, say
        time.sleep(5)  # interrupted long before this ends
    assert received() == signal.SIGINT
    with JobGuard():  # the next train() call runs
        assert received() is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_owner_is_identified_by_pid_and_start_time():
    me = Owner.current()
    assert me.alive() is True
    assert Owner.parse(me.token()) == me
    assert Owner(me.host, me.pid, me.started - 3).alive() is False  # pid reused
    assert _dead_owner().alive() is False
    assert Owner("elsewhere.invalid", me.pid, me.started).alive() is None
    assert Owner.parse("garbage") is None


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf"])
def test_bad_timing_variables_are_refused_with_a_fix(value, monkeypatch):
    monkeypatch.setenv(STALE_AFTER_ENV, value)
    with pytest.raises(FitscopeError, match=r"FITSCOPE_STALE_AFTER_S=.* is not a positive .* Fix"):
        env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)


def test_heartbeat_advances_while_a_run_is_open(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.setenv(HEARTBEAT_ENV, "0.2")
    monkeypatch.setattr(liveness, "heartbeats", Heartbeats())
    client = get_client()
    exp_id = ensure_experiment(client, "t_heartbeat")
    claim = claim_run(client, exp_id, "beef", "beat", {}, {})
    first = float(client.get_run(claim.tracker.run_id).data.tags[HEARTBEAT_TAG])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        tags = client.get_run(claim.tracker.run_id).data.tags
        if float(tags[HEARTBEAT_TAG]) > first:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the heartbeat never advanced")
    claim.tracker.finish()
    assert claim.tracker.run_id not in liveness.heartbeats._runs
