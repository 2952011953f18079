"""Claiming a config before training it, so one config trains once even when identical
jobs race (docs/reliability.md), and taking over an interrupted run to resume it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fitscope.tracking import liveness
from fitscope.tracking.liveness import (
    Reconciled,
    create_owned_run,
    dead_reason,
    own_run,
    reconcile,
)
from fitscope.tracking.outcomes import KILLED, RUNNING, Outcome, end_run
from fitscope.tracking.run import RunTracker
from fitscope.tracking.store import (
    CLAIM_SETTLE_ENV,
    CLAIM_SETTLE_S,
    STALE_AFTER_ENV,
    STALE_AFTER_S,
    env_seconds,
    sqlite_path,
    store_lock,
)
from fitscope.tracking.tags import CONFIG_HASH_TAG, FAILURE_TAG, TAG, tag_equals


@dataclass
class Claim:
    """The outcome of :func:`claim_run`: exactly one of the three is set."""

    tracker: RunTracker | None = None  # this process won: its run, RUNNING, heartbeat on
    finished: Any = None  # a FINISHED run of this config (skip unless force)
    holder: Any = None  # the live run that holds this config (skip, even with force)
    reconciled: list[Reconciled] = field(default_factory=list)


def _blocker(client, experiment_id: str, chash: str, force: bool, mine=None) -> Claim | None:
    """What keeps this process from training ``chash`` (None: nothing, or ``mine`` wins)."""
    runs = client.search_runs(
        [experiment_id], filter_string=tag_equals(CONFIG_HASH_TAG, chash), max_results=1000
    )
    if not force:
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished:
            return Claim(finished=max(finished, key=lambda r: r.info.start_time))
    stale_after = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
    live = [r for r in runs if r.info.status == "RUNNING" and not dead_reason(r, stale_after)]
    if not live:
        return None
    first = min(live, key=lambda r: (r.info.start_time, r.info.run_id))
    if mine is not None and first.info.run_id == mine:
        return None
    return Claim(holder=first)


def claim_run(
    client,
    experiment_id: str,
    chash: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    *,
    force: bool = False,
    settle_s: float | None = None,
    exact: bool | None = None,
) -> Claim:
    """Claim config ``chash`` with a RUNNING run, unless a live run or a FINISHED one holds it.

    MLflow has no compare-and-set, so on a shared store (a tracking server, a database)
    the claim is: reconcile dead owners' runs; create the claim run; wait ``settle_s``;
    list the live RUNNING runs (and, unless ``force``, the FINISHED ones) of the config;
    the earliest ``(start_time, run_id)`` wins. A loser ends its claim KILLED and deletes
    it (``delete_run``), so no stray run remains. The start times come from each client's
    clock: this is exact as long as ``settle_s`` exceeds the clock skew between the hosts
    plus the store's write latency (NTP keeps skew to milliseconds; the default is 3 s).

    On a local SQLite store (``exact``, the default there) the whole check-and-create
    runs under the store's file lock, which makes it exact and needs no settle time.
    """
    from mlflow.entities import Param, RunTag

    if exact is None:
        exact = sqlite_path(client.tracking_uri) is not None
    if settle_s is None:
        settle_s = 0.0 if exact else env_seconds(CLAIM_SETTLE_ENV, CLAIM_SETTLE_S)
    lock = store_lock(client.tracking_uri) if exact else contextlib.nullcontext()
    with lock:
        reconciled = reconcile(client, [experiment_id])
        blocker = _blocker(client, experiment_id, chash, force)
        if blocker is not None:
            blocker.reconciled = reconciled
            return blocker
        run_tags = {**tags, CONFIG_HASH_TAG: chash}
        run_id = create_owned_run(client, experiment_id, run_name, run_tags)
        if settle_s:
            time.sleep(settle_s)
            blocker = _blocker(client, experiment_id, chash, force, mine=run_id)
            if blocker is not None:
                held_by = (blocker.holder or blocker.finished).info.run_id
                client.log_batch(run_id, tags=[RunTag(f"{TAG}claim_lost_to", held_by)])
                end_run(client, run_id, Outcome(KILLED, f"claim lost to run {held_by}"))
                client.delete_run(run_id)
                blocker.reconciled = reconciled
                return blocker
    own_run(client, run_id)
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    return Claim(tracker=RunTracker(client, run_id), reconciled=reconciled)


def take_over(client, claim: RunTracker, run_id: str, chash: str, monitor: str):
    """Continue the KILLED run ``run_id`` of config ``chash`` instead of the new ``claim``.

    The old run becomes RUNNING under this process (owner tags, heartbeat) before the
    claim run is deleted, so a live run holds the config throughout. Returns the old run's
    tracker and the last epoch it logged (-1 if none), or None (and nothing changes) when
    that run is not a KILLED run of this config.
    """
    from mlflow.exceptions import MlflowException

    try:
        old = client.get_run(run_id)
    except MlflowException:
        return None
    if old.info.status != KILLED or old.data.tags.get(CONFIG_HASH_TAG) != chash:
        return None
    # Owner tags and heartbeat first: a reconcile elsewhere that sees it RUNNING sees us.
    resumed = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} (claim {claim.run_id})"
    own_run(client, run_id, {f"{TAG}resumed": resumed})
    if FAILURE_TAG in old.data.tags:
        client.delete_tag(run_id, FAILURE_TAG)
    client.update_run(run_id, status=RUNNING)
    liveness.heartbeats.discard(claim.run_id)
    end_run(client, claim.run_id, Outcome(KILLED, f"replaced by the resumed run {run_id}"))
    client.delete_run(claim.run_id)  # the claim was only a placeholder: no stray run stays
    logged = [m.step for m in client.get_metric_history(run_id, monitor)]
    return RunTracker(client, run_id), max(logged, default=-1)
