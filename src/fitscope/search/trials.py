"""A search's trials in its Optuna study: who runs each, the budget left, interrupted
trials continued under their own name, and each process's sampler seed.

Trials are asked and told by the search's sweeper (Optuna's ask-and-tell interface);
each asked trial records its owner, the sweeper's process. A trial whose owner is gone
(the search was interrupted or killed) is failed and enqueued again with its parameters
and its name, so the next trial to be asked continues it (its MLflow run resumes from
its checkpoint) and the budget still counts it once.
"""

from __future__ import annotations

import contextlib
import zlib
from typing import Any

from fitscope.core.process import Owner

OWNER_ATTR = "fitscope.owner"  # the sweeper process that asked the trial (Owner token)
NAME_ATTR = "fitscope.name"  # the trial's name (its run's variant); kept by a continuation
INTERRUPTED_ATTR = "fitscope.interrupted"  # why an unfinished trial was failed and requeued
PRUNED_ATTR = "fitscope.pruned_at_epoch"  # set by the training that the pruner stopped
RUN_ATTR = "mlflow_run_id"  # the trial's MLflow run, set by its training
SWEEPER_ATTR = "fitscope.sweeper."  # + Owner token: one per sweeper process, in order


def trial_name(trial: Any) -> str:
    """``trial-<number>``, or the name of the interrupted trial this one continues."""
    return trial.user_attrs.get(NAME_ATTR) or f"trial-{trial.number}"


def claim(trial: Any, owner: Owner) -> str:
    """Record this process as the trial's owner and give the trial its name."""
    name = trial_name(trial)
    trial.set_user_attr(OWNER_ATTR, owner.token())
    trial.set_user_attr(NAME_ATTR, name)
    return name


def sampler_offset(study: Any, owner: Owner) -> int:
    """What this process adds to its sampler's seed: 0 for the first process of a study,
    so a new search draws what its seed says; a number of its own for every later one
    (a re-run, a second process sharing the study), which would otherwise draw the first
    process's values again. Registering first makes two processes started at once see
    each other."""
    key = SWEEPER_ATTR + owner.token()
    study.set_user_attr(key, True)
    joined = [k for k in study.user_attrs if k.startswith(SWEEPER_ATTR)]
    return 0 if joined == [key] else 1 + zlib.crc32(key.encode()) % 1_000_003


def continue_trial(study: Any, trial: Any, why: str) -> bool:
    """Fail the unfinished ``trial`` (``why``) and enqueue its parameters under its name;
    False when another process already did (or it ended meanwhile)."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    storage, trial_id = study._storage, trial._trial_id
    try:
        storage.set_trial_user_attr(trial_id, INTERRUPTED_ATTR, why)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return False
    except (UpdateFinishedTrialError, RuntimeError):
        return False
    study.enqueue_trial(
        dict(trial.params), user_attrs={NAME_ATTR: trial_name(trial)}, skip_if_exists=False
    )
    return True


def orphaned(study: Any) -> list[Any]:
    """The study's RUNNING trials whose owner process is gone (on this host)."""
    from optuna.trial import TrialState

    found = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = Owner.parse(trial.user_attrs.get(OWNER_ATTR))
        if owner is not None and owner.alive() is False:
            found.append(trial)
    return found


def continue_orphans(study: Any) -> list[str]:
    """Continue every orphaned trial (see :func:`continue_trial`), and enqueue again an
    interrupted trial that has no continuation (a signal between its failure and its
    enqueue); the names continued."""
    names = []
    for trial in orphaned(study):
        if continue_trial(study, trial, "its sweeper process ended before the trial did"):
            names.append(trial_name(trial))
    trials = study.get_trials(deepcopy=False)
    newest: dict[str, int] = {}  # each name's latest trial: an interrupted one's continuation
    for t in trials:
        newest[trial_name(t)] = max(t.number, newest.get(trial_name(t), -1))
    for trial in trials:
        if _interrupted(trial) and newest[trial_name(trial)] == trial.number:
            study.enqueue_trial(dict(trial.params), user_attrs={NAME_ATTR: trial_name(trial)})
            names.append(trial_name(trial))
    return names


def used_budget(study: Any) -> int:
    """Trials that count against ``n_trials``: finished (not the interrupted ones) and
    running. A waiting trial (an interrupted one's continuation) counts once it is
    asked: ``ask`` takes the waiting trials first."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    return sum(not _interrupted(t) and t.state != TrialState.WAITING for t in trials)


def finished_count(study: Any) -> int:
    """Trials that ended: COMPLETE, PRUNED or FAIL (not the interrupted ones)."""
    return sum(
        t.state.is_finished() and not _interrupted(t) for t in study.get_trials(deepcopy=False)
    )


def _interrupted(trial: Any) -> bool:
    from optuna.trial import TrialState

    return INTERRUPTED_ATTR in trial.user_attrs and trial.state == TrialState.FAIL


def pruned_epoch(study: Any, trial: Any) -> int | None:
    """The epoch at which the trial's training was pruned (stored by the training)."""
    with contextlib.suppress(KeyError):
        fresh = study._storage.get_trial(trial._trial_id)
        epoch = fresh.user_attrs.get(PRUNED_ATTR)
        return None if epoch is None else int(epoch)
    return None
