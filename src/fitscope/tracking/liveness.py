"""Whether a run's owner is alive: owner tags, heartbeats, and reconciling the runs whose
owner is gone to KILLED.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.core.process import Owner, block_signals_in_this_thread
from fitscope.tracking.outcomes import KILLED, Outcome, end_run
from fitscope.tracking.store import (
    HEARTBEAT_ENV,
    HEARTBEAT_S,
    STALE_AFTER_ENV,
    STALE_AFTER_S,
    env_seconds,
)
from fitscope.tracking.tags import (
    HEARTBEAT_TAG,
    OWNER_HOST_TAG,
    OWNER_PID_TAG,
    OWNER_STARTED_TAG,
    RECONCILED_TAG,
    TAG,
)

log = logging.getLogger(__name__)


def owner_tags(owner: Owner | None = None) -> dict[str, str]:
    """Who holds a run open, and their first heartbeat."""
    owner = owner or Owner.current()
    return {
        OWNER_HOST_TAG: owner.host,
        OWNER_PID_TAG: str(owner.pid),
        OWNER_STARTED_TAG: repr(owner.started),
        HEARTBEAT_TAG: f"{time.time():.3f}",
    }


def run_owner(run) -> Owner | None:
    tags = run.data.tags
    try:
        return Owner(tags[OWNER_HOST_TAG], int(tags[OWNER_PID_TAG]), float(tags[OWNER_STARTED_TAG]))
    except (KeyError, ValueError):
        return None


def dead_reason(run, stale_after_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING run's owner is gone, or None while it may still be alive.

    On this host the owner's pid and start time decide (a reused pid is not the owner).
    For another host, or a run without owner tags, only the heartbeat (or the start time)
    can: it is dead after ``stale_after_s`` seconds without one. That compares this
    host's clock with the owner's: keep ``stale_after_s`` far above the clock skew.
    """
    owner = run_owner(run)
    if owner is not None and owner.on_this_host():
        return None if owner.alive() else f"its process ({owner}) is gone"
    try:
        last = float(run.data.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        last = run.info.start_time / 1000
    age = (time.time() if now is None else now) - last
    if age <= stale_after_s:
        return None
    who = f"host {owner.host}" if owner is not None else "its process (no owner recorded)"
    return f"no heartbeat from {who} for {age:.0f} s (stale after {stale_after_s:g} s)"


@dataclass(frozen=True)
class Reconciled:
    """A RUNNING run whose owner was gone, now KILLED."""

    run_id: str
    experiment_id: str
    run_name: str
    reason: str


def reconcile(
    client, experiment_ids: list[str], stale_after_s: float | None = None
) -> list[Reconciled]:
    """End as KILLED every fitscope run in the experiments that is RUNNING without an owner.

    The reason goes into the ``fitscope.failure`` tag, the time and the reconciling process
    into ``fitscope.reconciled``. Runs that fitscope did not open are left alone.
    """
    from mlflow.entities import RunTag

    if stale_after_s is None:
        stale_after_s = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
    runs = client.search_runs(
        experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=5000
    )
    now = time.time()
    stamp = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} by {Owner.current()}"
    done = []
    for run in runs:
        if not any(k.startswith(TAG) for k in run.data.tags):
            continue
        reason = dead_reason(run, stale_after_s, now)
        if reason is None:
            continue
        run_id = run.info.run_id
        client.log_batch(run_id, tags=[RunTag(RECONCILED_TAG, stamp)])
        end_run(client, run_id, Outcome(KILLED, f"reconciled: {reason}"))
        done.append(Reconciled(run_id, run.info.experiment_id, run.info.run_name or "", reason))
    return done


def reconcile_store(
    client, experiment: str | None = None, stale_after_s: float | None = None
) -> tuple[list[Reconciled], list, dict[str, str]]:
    """Reconcile one experiment (by name) or all: (runs KILLED, runs still RUNNING, names).

    ``names`` maps experiment ids to names.
    """
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise FitscopeError(
                f"no MLflow experiment named {experiment!r} in {client.tracking_uri}. Fix: "
                "check the name (`mlflow experiments search`), or leave --experiment out"
            )
        exps = [exp]
    else:
        exps = client.search_experiments()
    names = {e.experiment_id: e.name for e in exps}
    changed = reconcile(client, list(names), stale_after_s) if names else []
    running = (
        client.search_runs(
            list(names), filter_string="attributes.status = 'RUNNING'", max_results=5000
        )
        if names
        else []
    )
    return changed, running, names


class Heartbeats:
    """One daemon thread per process stamps ``fitscope.heartbeat`` on the runs it holds open."""

    def __init__(self) -> None:
        self._runs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, client, run_id: str) -> None:
        interval = env_seconds(HEARTBEAT_ENV, HEARTBEAT_S)
        with self._lock:
            self._runs[run_id] = client
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat, args=(interval,), name="fitscope-heartbeat", daemon=True
                )
                self._thread.start()

    def discard(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _beat(self, interval: float) -> None:
        block_signals_in_this_thread()
        while True:
            time.sleep(interval)
            with self._lock:
                runs = list(self._runs.items())
            for run_id, client in runs:
                try:
                    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
                except Exception as exc:  # a missed beat is not worth a crashed run
                    log.debug("heartbeat for run %s failed: %s", run_id, exc)


heartbeats = Heartbeats()


def create_owned_run(client, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A new RUNNING run owned by this process (its owner tags); the run id. Its heartbeat
    starts with :func:`own_run` once the caller keeps it."""
    run_tags = {**tags, **owner_tags()}
    return client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id


def own_run(client, run_id: str, tags: dict[str, str] | None = None) -> None:
    """This process owns ``run_id`` now (an existing run taken over gets its owner tags
    and ``tags`` first): its heartbeat runs until the run ends."""
    from mlflow.entities import RunTag

    if tags is not None:
        everything = {**owner_tags(), **tags}
        client.log_batch(run_id, tags=[RunTag(k, v) for k, v in everything.items()])
    heartbeats.add(client, run_id)
