"""How runs end, decided in one place: the MLflow statuses fitscope uses, a run's
:class:`Outcome` (status and reason), the pure decisions about a sweep's parent run (its
status from its children's, its best child), and :func:`end_run`, which records an
outcome on a run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fitscope.tracking.tags import FAILURE_TAG

RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
TERMINAL = (FINISHED, FAILED, KILLED)


@dataclass(frozen=True)
class Outcome:
    """How a run ends: its MLflow status and, unless FINISHED, why (the
    ``fitscope.failure`` tag)."""

    status: str
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.status not in TERMINAL:
            raise ValueError(f"a run ends FINISHED, FAILED or KILLED, not {self.status!r}")
        if (self.status == FINISHED) != (self.reason is None):
            raise ValueError("a FINISHED run has no failure reason; any other status has one")


def effective_statuses(children: list[tuple[str, str, int]]) -> dict[str, str]:
    """One status per config of ``(config, status, start_time)`` runs: FINISHED if any run
    of it finished, else the status of its newest run."""
    by_config: dict[str, list[tuple[str, int]]] = {}
    for config, status, start in children:
        by_config.setdefault(config, []).append((status, start))
    return {
        config: FINISHED
        if any(s == FINISHED for s, _ in runs)
        else max(runs, key=lambda run: run[1])[0]
        for config, runs in by_config.items()
    }


def parent_outcome(
    effective: list[str],
    *,
    any_finished: bool,
    interrupted: bool = False,
    failed: bool = False,
    tolerate_failures: bool = False,
) -> Outcome:
    """A sweep parent's end from its configs' effective statuses.

    KILLED when the sweep was interrupted or a config's latest run was killed; FAILED when
    the sweep itself failed, no child finished, or (unless ``tolerate_failures``, as in a
    search) a config's runs all failed; else FINISHED.
    """
    if interrupted:
        return Outcome(KILLED, "the sweep was interrupted")
    if KILLED in effective:
        return Outcome(KILLED, f"{effective.count(KILLED)} config(s) ended KILLED")
    if failed:
        return Outcome(FAILED, "the sweep failed (see its output)")
    if not any_finished:
        return Outcome(FAILED, "no child run finished")
    if FAILED in effective and not tolerate_failures:
        return Outcome(FAILED, f"{effective.count(FAILED)} config(s) failed")
    return Outcome(FINISHED)


def best_child(finished: list[Any], key: str, objective: str) -> Any:
    """The child with the best ``key`` metric: lowest for a loss, else highest."""
    sign = 1 if objective.endswith("loss") else -1
    return min(finished, key=lambda run: sign * run.data.metrics[key])


def end_run(
    client, run_id: str, outcome: Outcome, tags: Mapping[str, str] = (), end_time=None
) -> None:
    """Record ``outcome`` on run ``run_id``: the reason in ``fitscope.failure`` (a stale one
    from an earlier attempt, among the run's current ``tags``, is removed when it
    finished), then its terminal status."""
    if outcome.reason is not None:
        client.set_tag(run_id, FAILURE_TAG, outcome.reason[:8000])
    elif FAILURE_TAG in dict(tags):
        client.delete_tag(run_id, FAILURE_TAG)  # from an earlier attempt or a reconcile
    client.set_terminated(run_id, status=outcome.status, end_time=end_time)
