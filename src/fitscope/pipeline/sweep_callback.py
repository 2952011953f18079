"""The Hydra callback of every run and sweep: validates each job before anything exists,
opens one MLflow parent run per study, counts finished jobs, and closes the parents with
the sweep's outcome.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fitscope.core.dirlock import HOLD_FILE, hold_dir, release_dir
from fitscope.core.errors import first_line
from fitscope.core.fileio import check_writable_dir
from fitscope.core.progress import JOBS_DONE_FILE, SWEEP_JOBS_ENV, job_done
from fitscope.pipeline.cluster import prepare_driver
from fitscope.pipeline.identity import entry_name, parent_spec, study_description
from fitscope.pipeline.job import validate
from fitscope.pipeline.lifecycle import RESUME_HINT, Interrupted, received, signal_name
from fitscope.pipeline.search import check_search
from fitscope.pipeline.sweeps import callback_errors_exit, is_search, validate_jobs, validate_run
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.offline import PendingRecord, spool_dir
from fitscope.tracking.parents import close_parent, find_or_create_parent
from fitscope.tracking.store import get_client, resolve_tracking_uri, server_down, unreachable
from fitscope.tracking.tags import (
    PARENT_ENV,
    PARENT_SPEC_ENV,
    commit_parent_key,
    config_hash,
    source_tags,
    sweep_parents,
)
from fitscope.training.threads import THREADS_FIXED_ENV

log = logging.getLogger(__name__)


class SweepCallback(Callback):
    """The Hydra callback of every run and sweep: validates each run and sweep job before
    anything exists; groups a multirun's jobs under one MLflow parent run per study
    (created before any job; a DVC train stage's jobs span several); counts finished jobs;
    closes the parents with the sweep's outcome and turns it into the exit line."""

    @callback_errors_exit
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Before Hydra creates the run directory: a bad config leaves nothing behind.
        validate_run(config, validate)
        check_writable_dir(config.hydra.run.dir, "hydra.run.dir", create=False)

    @callback_errors_exit
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Every job is checked before anything exists: a bad job creates no parent run.
        check_writable_dir(config.hydra.sweep.dir, "hydra.sweep.dir", create=False)
        studies = _validate_sweep(config)
        # Two sweeps in one directory would mix their jobs' files: the second is refused
        # before it touches any (the counters of an earlier sweep there are reset after).
        hold_dir(config.hydra.sweep.dir, "hydra.sweep.dir")
        # Workers inherit it; joblib sets OMP_NUM_THREADS in them, never in this process.
        os.environ[THREADS_FIXED_ENV] = "1" if os.environ.get("OMP_NUM_THREADS") else ""
        (Path(config.hydra.sweep.dir) / FAILED_JOBS).unlink(missing_ok=True)
        (Path(config.hydra.sweep.dir) / JOBS_DONE_FILE).unlink(missing_ok=True)
        if config.logger.name == "mlflow":
            _open_parents(_parent_specs(config, studies), studies)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        # Runs in the job's own process (also a joblib worker): "<done>/<total> jobs done".
        total = os.environ.get(SWEEP_JOBS_ENV)
        if total and config.get("progress") and config.hydra.mode == RunMode.MULTIRUN:
            # A DVC train stage's jobs span studies: the stage names the sweep.
            job_done(config.hydra.sweep.dir, int(total), os.environ.get("DVC_STAGE", config.study))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        release_dir(Path(config.hydra.sweep.dir) / HOLD_FILE)  # (else at exit)
        failed_file = Path(config.hydra.sweep.dir) / FAILED_JOBS
        failed = failed_file.read_text().splitlines() if failed_file.exists() else []
        parents, offline = sweep_parents(), sweep_parents(PARENT_SPEC_ENV)
        os.environ.pop(PARENT_ENV, None)
        os.environ.pop(PARENT_SPEC_ENV, None)
        signum = received()
        best, cut_off = _close_parents(config, parents, interrupted=signum is not None)
        if offline:
            cut_off = True  # no parent to judge the sweep by: the sync closes it
            _say_records_wait()
        if signum is not None:
            # Ctrl-C / SIGTERM reached the jobs in the workers; each ended its run KILLED
            # and returned, so the sweep ended normally. Report it as the interrupt it is.
            raise Interrupted(signum, interrupt_message(signal_name(signum), failed))
        message = sweep_failure(
            failed,
            failed_file,
            search=is_search(config),
            parents=list(parents.values()),
            judged=best is not None or cut_off,
        )
        if message:
            raise SystemExit(message)


def interrupt_message(signal: str, failed: list[str]) -> str:
    """The sweep's one line after SIGINT/SIGTERM, naming the runs the signal KILLED
    (``failed``: the lines of failed_jobs.tsv, ``num<TAB>variant<TAB>reason``)."""
    stopped = [
        f"job {num} {variant} at epoch {m.group(1)}"
        for num, variant, reason in (line.split("\t", 2) for line in failed)
        if (m := re.match(r"interrupted at epoch (\d+)", reason))
    ]
    detail = f"; runs KILLED: {', '.join(stopped)}" if stopped else ""
    return f"interrupted ({signal}){detail}; {RESUME_HINT}"


def sweep_failure(
    failed: list[str], failed_file: Path, *, search: bool, parents: list[str], judged: bool
) -> str | None:
    """The sweep's one-line error, or None when it succeeded.

    A plain sweep (every DVC train stage) fails when any job failed; a search tolerates
    failed trials and fails only when none finished (``judged``: a best trial was found,
    or the parents are left to the sync, which judges them).
    """
    if search:
        if parents and not judged:
            return (
                f"fitscope: error: every job of the sweep failed (MLflow parent run "
                f"{', '.join(parents)}; each FAILED run has the reason in its "
                "fitscope.failure tag). Fix: see those reasons, e.g. narrow the learning-rate range"
            )
        return None
    if failed:
        names = ", ".join(line.split("\t")[1] for line in failed)
        return (
            f"fitscope: error: {len(failed)} job(s) of the sweep failed ({names}); the "
            f"reasons are in {failed_file} and the FAILED MLflow runs. Fix: see those reasons"
        )
    return None


def _close_parents(
    config: DictConfig, parents: dict[str, str], interrupted: bool
) -> tuple[dict | None, bool]:
    """Close each study's parent; the best child found and whether a parent was left to
    ``fitscope runs sync`` (the server was unreachable)."""
    best, cut_off = None, False
    for parent in parents.values():
        try:
            best = (
                close_parent(
                    get_client(),
                    parent,
                    config.objective,
                    interrupted=interrupted,
                    tolerate_failures=is_search(config),
                )
                or best
            )
        except Exception as exc:
            if not unreachable(exc):
                raise
            cut_off = True  # the jobs kept their records: the sync closes the parent
            log.warning(
                "the sweep's parent run %s is not closed (the tracking server is "
                "unreachable); `fitscope runs sync` closes it with the jobs' runs",
                parent,
            )
    return best, cut_off


def _say_records_wait() -> None:
    if PendingRecord.all(spool_dir()):
        log.warning(
            "fitscope: the sweep's runs wait to be synced (the tracking server was "
            "unreachable): their records are in %s; when the server is back, run "
            "`fitscope runs sync` (it also nests them under the sweep's parent run)",
            spool_dir(),
        )


FAILED_JOBS = "failed_jobs.tsv"


def _validate_sweep(config: DictConfig) -> dict[str, DictConfig]:
    """Check every job of the sweep; the first job of each study."""
    studies: dict[str, DictConfig] = {}

    def check(job: DictConfig) -> None:
        validate(job)
        studies.setdefault(job.study, job)

    jobs = validate_jobs(config, check)
    if is_search(config):
        check_search(config)
    prepare_driver(config.hydra.launcher)
    log.info("sweep of %d job(s) validated; outputs in %s", jobs, config.hydra.sweep.dir)
    # A search's jobs are drawn as it goes: its count is the trial budget. Workers
    # (started after this hook) inherit the variable.
    total = config.hydra.sweeper.n_trials if is_search(config) else jobs
    os.environ[SWEEP_JOBS_ENV] = str(total)
    return studies


def _parent_specs(config: DictConfig, studies: dict[str, DictConfig]) -> dict[str, dict]:
    """One parent run per study (MLflow experiment); a DVC train stage's jobs span several.

    The same sweep finds its parents again when restarted, even with another launcher,
    more trials or more parallel jobs: only what defines the jobs goes into the key.
    """
    overrides = list(config.hydra.overrides.task)
    sweeper = OmegaConf.to_container(config.hydra.sweeper, resolve=False)
    source = source_tags(entry_name())
    specs: dict[str, dict[str, Any]] = {}
    for study, job in studies.items():
        if config.tracking.parent_key:
            # An explicit key (DVC sets one) groups the sweeps of one pipeline run under
            # one parent per study: same key and same git commit. Several stages share
            # it, each with its own overrides: those are on each child run, not here.
            key = commit_parent_key(config.tracking.parent_key, source["mlflow.source.git.commit"])
            specs[study] = parent_spec(study, job.profile, key, source)
            continue
        identity = {
            "study": study,
            "overrides": sorted(o for o in overrides if not o.startswith(("hydra.", "hydra/"))),
            "sweeper": {k: sweeper.get(k) for k in ("sampler", "params", "direction")},
        }
        extra = {"fitscope.overrides": " ".join(overrides)}
        specs[study] = parent_spec(study, job.profile, config_hash(identity), source, **extra)
    return specs


def _open_parents(specs: dict[str, dict], studies: dict[str, DictConfig]) -> None:
    """Find or create each study's parent; the jobs (also joblib/loky workers, started
    after this hook) inherit them in FITSCOPE_PARENT_RUN_ID. With the server down, they
    inherit the specs instead and make the parents themselves."""
    uri = resolve_tracking_uri()
    parents: dict[str, str] = {}
    try:
        client = get_client(uri)
        for study, spec in specs.items():
            exp_id = ensure_experiment(client, study, study_description(studies[study]))
            parents[study] = find_or_create_parent(
                client,
                exp_id,
                spec["parent_key"],
                run_name=spec["parent_name"],
                tags=spec["parent_tags"],
            )
    except Exception as exc:
        if not server_down(uri, exc):
            raise
        # The jobs train anyway; each finds or creates its parent once the server is
        # back, or keeps it in its pending record for `fitscope runs sync`.
        os.environ[PARENT_SPEC_ENV] = json.dumps(specs)
        log.warning(
            "the tracking server %s is unreachable (%s): the jobs train anyway and keep "
            "their records on disk; the sweep's parent runs are made when they reach the "
            "server or by `fitscope runs sync`",
            uri,
            first_line(exc),
        )
        return
    os.environ[PARENT_ENV] = json.dumps(parents)
    for study, parent in parents.items():
        log.info("MLflow parent run %s in experiment %r", parent, study)
