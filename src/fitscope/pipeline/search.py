"""A hyperparameter search through Optuna's ask-and-tell interface: the sweeper's loop
(``hydra_plugins.fitscope_sweeper.OptunaSearchSweeper``) and a trial job's feed.

The sweeper asks the stored study for a batch of trials, launches them as Hydra jobs with
whatever launcher is chosen (basic, joblib, Ray, submitit) and tells the study each
outcome: COMPLETE with the objective, PRUNED, or FAIL. Each job reports its objective
every epoch to its trial (the pruner's input, and Optuna's intermediate values).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobStatus
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import write_json
from fitscope.core.process import Owner
from fitscope.core.progress import SWEEP_JOBS_ENV
from fitscope.pipeline.lifecycle import received
from fitscope.pipeline.sweeps import parse_overrides
from fitscope.search.feed import TrialFeed
from fitscope.search.space import override_line, split_space
from fitscope.search.storage import (
    STORAGE_TAG,
    STUDY_TAG,
    describe,
    open_storage,
    resolve_storage,
)
from fitscope.search.trials import (
    claim,
    continue_orphans,
    continue_trial,
    finished_count,
    pruned_epoch,
    sampler_offset,
    used_budget,
)
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import PRUNED_TAG, sweep_parents

log = logging.getLogger(__name__)

RESULTS_FILE = "optimization_results.json"  # in the sweep directory: the study's best trial


def check_search(config: DictConfig) -> None:
    """Refuse a search that cannot work, before its parent run or any trial exists."""
    import optuna

    sweeper = config.hydra.sweeper
    url = resolve_storage(sweeper.storage, config.hydra.sweep.dir)
    if isinstance(instantiate(sweeper.pruner), optuna.pruners.NopPruner):
        return
    if url is None:
        raise FitscopeError(
            "a pruner needs the study stored where the trials can reach it. Fix: set "
            "hydra.sweeper.storage=auto (a journal file) or a database URL"
        )
    if config.trainer.strategy == "ddp_spawn":
        raise FitscopeError(
            "a pruner stops one training process, not trainer.strategy=ddp_spawn's several. "
            "Fix: hydra/sweeper/pruner=none, or one process per trial"
        )


def open_search_study(sweeper: DictConfig, sweep_dir: str, owner: Owner) -> tuple[Any, str | None]:
    """The search's study (created, or loaded to continue) and its resolved storage."""
    import optuna

    url = resolve_storage(sweeper.storage, sweep_dir)
    pruner = instantiate(sweeper.pruner)
    study = optuna.create_study(
        study_name=sweeper.study_name,
        storage=open_storage(url),
        direction=sweeper.direction,
        pruner=pruner,
        load_if_exists=True,
    )
    offset = sampler_offset(study, owner) if url else 0
    seed = sweeper.sampler.get("seed")
    study.sampler = instantiate(sweeper.sampler, seed=None if seed is None else seed + offset)
    return study, url


def trial_overrides(
    trial: Any, name: str, fixed: list[str], study: str, url: str | None
) -> list[str]:
    """A trial's job: the fixed overrides, its drawn values, its name and where it reports."""
    drawn = [override_line(k, v) for k, v in trial.params.items()]
    # Described: a database password never reaches a job's config, overrides or logs.
    storage = "null" if url is None else f"'{describe(url)}'"
    where = [f"trial.number={trial.number}", f"trial.study={study}", f"trial.storage={storage}"]
    return [*fixed, *drawn, f"variant={name}", *where]


def run_search(
    sweeper: DictConfig, config: DictConfig, launcher: Any, arguments: list[str]
) -> None:
    """Ask, launch and tell trials until the study holds ``n_trials`` (interrupted trials
    are continued, finished ones never re-run); write the best trial to the sweep dir."""
    owner = Owner.current()
    study, url = open_search_study(sweeper, config.hydra.sweep.dir, owner)
    params = OmegaConf.to_container(sweeper.params, resolve=False) if sweeper.params else {}
    fixed, space = split_space(parse_overrides([f"{k}={v}" for k, v in params.items()] + arguments))
    tag_parents(study.study_name, url)
    continued = continue_orphans(study)
    left = sweeper.n_trials - finished_count(study)
    log.info(
        "study %r in %s: %d of %d trials left%s",
        study.study_name,
        describe(url),
        max(left, 0),
        sweeper.n_trials,
        f" (continuing the interrupted {', '.join(continued)})" if continued else "",
    )
    os.environ[SWEEP_JOBS_ENV] = str(max(left, 0))  # the progress line counts this run's
    job_idx, told, failed = 0, 0, 0
    while (left := sweeper.n_trials - used_budget(study)) > 0 and received() is None:
        batch = [study.ask(space) for _ in range(min(sweeper.n_jobs, left))]
        jobs = [trial_overrides(t, claim(t, owner), fixed, study.study_name, url) for t in batch]
        try:
            returns = launcher.launch(jobs, initial_job_idx=job_idx)
        except BaseException:  # an interrupt in this process: the trials continue next time
            for trial in batch:
                continue_trial(study, trial, "the search was interrupted")
            raise
        job_idx += len(returns)
        for trial, job_return in zip(batch, returns, strict=True):
            failed += not tell(study, trial, job_return)
            told += 1
        if told and failed / told > sweeper.max_failure_rate:
            log.error(
                "%d of %d trials failed: over max_failure_rate, the search stops", failed, told
            )
            break
        if url is not None:
            continue_orphans(study)  # trials of another process sharing the study, killed
    write_results(study, Path(config.hydra.sweep.dir), url)


def tag_parents(study_name: str, url: str | None) -> None:
    """Name the study and its storage on the search's parent runs (the report loads it)."""
    parents = sweep_parents()
    try:
        client = get_client()
        for parent in parents.values():
            client.set_tag(parent, STUDY_TAG, study_name)
            client.set_tag(parent, STORAGE_TAG, describe(url))
    except Exception as exc:  # the server is down: the jobs keep their records anyway
        log.warning("could not name the Optuna study on the parent run: %s", exc)


def tell(study: Any, trial: Any, job_return: Any) -> bool:
    """Tell the study how ``trial``'s job ended; False when it failed."""
    from optuna.trial import TrialState

    value = job_return.return_value if job_return.status == JobStatus.COMPLETED else None
    finite = isinstance(value, int | float) and math.isfinite(value)
    if not finite and received() is not None:  # stopped by the interrupt: continued later
        continue_trial(study, trial, "the search was interrupted")
        return True
    if finite and pruned_epoch(study, trial) is not None:
        study.tell(trial, state=TrialState.PRUNED)
    elif finite:
        study.tell(trial, float(value))
    else:
        study.tell(trial, state=TrialState.FAIL)
    return finite


def write_results(study: Any, sweep_dir: Path, url: str | None) -> None:
    """The best trial so far, as the upstream Optuna sweeper leaves it (JSON, no YAML)."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not done:
        return
    best = study.best_trial
    write_json(
        sweep_dir / RESULTS_FILE,
        {
            "study": study.study_name,
            "storage": describe(url),
            "trials_complete": len(done),
            "best_trial": best.number,
            "best_value": best.value,
            "best_params": best.params,
        },
    )


def pruned_tags(epoch: int) -> dict[str, str]:
    """What a pruned trial's MLflow run carries: it FINISHED early, by the pruner's choice."""
    return {
        PRUNED_TAG: f"at epoch {epoch}: the search's pruner stopped this trial",
        "optuna.trial_state": "PRUNED",
    }


def trial_feed(cfg: DictConfig) -> TrialFeed | None:
    """The per-epoch feed of a search trial's job (None outside a stored search)."""
    if cfg.trial.number is None or cfg.trial.storage is None:
        return None
    pruner = instantiate(HydraConfig.get().sweeper.pruner) if HydraConfig.initialized() else None
    return TrialFeed(cfg.trial.storage, cfg.trial.study, cfg.trial.number, pruner)
