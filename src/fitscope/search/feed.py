"""A trial's side of the search: its training reports the objective every epoch to the
trial in the stored study, which answers whether the study's pruner stops it here."""

from __future__ import annotations

from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.search.storage import STACK_STORAGE_ENV, open_storage, reachable_url
from fitscope.search.trials import PRUNED_ATTR, RUN_ATTR


class TrialFeed:
    """Reports a trial's epochs to its study and decides pruning.

    Works from any process that reaches the storage (a joblib or Ray worker too): the
    study is loaded from the storage with the search's pruner.
    """

    def __init__(self, storage: str, study_name: str, number: int, pruner: Any) -> None:
        import optuna

        # The job's config names the storage as describe() wrote it: no database password.
        url = reachable_url(storage)
        if url is None:
            raise FitscopeError(
                f"the search's study is in {storage}, which this process cannot reach. Fix: "
                f"export {STACK_STORAGE_ENV} (source stack.env) where the trials run"
            )
        try:
            study = optuna.load_study(
                study_name=study_name,
                storage=open_storage(url),
                pruner=pruner or optuna.pruners.NopPruner(),
            )
            trial_id = study._storage.get_trial_id_from_study_id_trial_number(
                study._study_id, number
            )
        except (KeyError, ValueError) as exc:
            raise FitscopeError(
                f"trial {number} of study {study_name!r} is not in {storage} "
                f"({exc}). Fix: let the search's sweeper set trial.*, not the command line"
            ) from None
        self.trial = optuna.trial.Trial(study, trial_id)
        self.pruned_at: int | None = None
        self.detached = False

    def report(self, epoch: int, value: float) -> bool:
        """Report the objective at ``epoch``; True when the pruner stops the trial here.

        A trial the study already ended (its sweeper died and another continued it) is
        no longer reported to: the training goes on, its run keeps its record.
        """
        from optuna.exceptions import UpdateFinishedTrialError

        if self.detached:
            return False
        try:
            self.trial.report(value, step=epoch)
        except UpdateFinishedTrialError:
            self.detached = True
            return False
        if self.trial.should_prune():
            self.pruned_at = epoch
            self.trial.set_user_attr(PRUNED_ATTR, epoch)
            return True
        return False

    def link_run(self, run_id: str) -> None:
        """Name the trial's MLflow run on the trial (the study links to the record)."""
        self.trial.set_user_attr(RUN_ATTR, run_id)
