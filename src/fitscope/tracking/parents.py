"""A sweep's parent run: found or created once per study, and closed with its best child
and its children's counts.
"""

from __future__ import annotations

from typing import Any

from fitscope.tracking import liveness
from fitscope.tracking.liveness import create_owned_run, own_run, reconcile
from fitscope.tracking.outcomes import (
    FAILED,
    FINISHED,
    KILLED,
    best_child,
    effective_statuses,
    end_run,
    parent_outcome,
)
from fitscope.tracking.run import summary_metrics
from fitscope.tracking.store import store_lock
from fitscope.tracking.tags import (
    CONFIG_HASH_TAG,
    FAILURE_TAG,
    PARENT_TAG,
    PRUNED_TAG,
    RECONCILED_TAG,
    TAG,
    tag_equals,
)


def find_or_create_parent(
    client, experiment_id: str, key: str, run_name: str, tags: dict[str, str] | None = None
) -> str:
    """The parent run tagged ``fitscope.parent_key=key``; created if absent (under the lock).

    This process becomes its owner: a parent found again (a re-run sweep) is RUNNING again
    until :func:`close_parent`, with this process's owner tags and heartbeat.
    """
    reconcile(client, [experiment_id])
    with store_lock(client.tracking_uri):
        runs = client.search_runs(
            [experiment_id],
            filter_string=tag_equals(f"{TAG}parent_key", key),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            run_id = runs[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for stale in (FAILURE_TAG, RECONCILED_TAG):
                if stale in runs[0].data.tags:
                    client.delete_tag(run_id, stale)
            own_run(client, run_id, {})
            return run_id
        run_tags = {f"{TAG}parent_key": key, f"{TAG}role": "parent", **(tags or {})}
        run_id = create_owned_run(client, experiment_id, run_name, run_tags)
        run_id = _oldest_parent(client, experiment_id, key, run_id)
    own_run(client, run_id)
    return run_id


def _oldest_parent(client, experiment_id: str, key: str, created: str) -> str:
    """The parent to use after creating ``created``: a server has no store lock, so two
    jobs may create the same parent at once; both keep the oldest and the other is deleted."""
    same = client.search_runs([experiment_id], filter_string=tag_equals(f"{TAG}parent_key", key))
    oldest = min(same, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
    if oldest is None or oldest.info.run_id == created:
        return created
    client.delete_run(created)
    return oldest.info.run_id


def close_parent(
    client,
    parent_id: str,
    objective: str | None = None,
    *,
    interrupted: bool = False,
    failed: bool = False,
    tolerate_failures: bool = False,
) -> dict[str, Any] | None:
    """End a sweep's parent run with its best child's params and objective.

    Its status comes from :func:`outcomes.parent_outcome`. Configs still RUNNING under
    another live sweep do not count (that sweep closes the parent again when it ends).
    Returns the best child's summary, or None when no child finished. ``objective``
    defaults to the one the children were trained with.
    """
    liveness.heartbeats.discard(parent_id)
    experiment_id = client.get_run(parent_id).info.experiment_id
    reconcile(client, [experiment_id])  # dead children are KILLED first
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [experiment_id], filter_string=tag_equals(PARENT_TAG, parent_id), max_results=5000
    )
    objective = objective or next(
        (c.data.params["objective"] for c in children if "objective" in c.data.params),
        "val/loss",
    )
    key = f"best/{objective}"
    done = [r for r in children if r.info.status == FINISHED and key in r.data.metrics]
    # A pruned trial finished early by the search's choice: it is never the best one.
    pruned = [r for r in done if PRUNED_TAG in r.data.tags]
    counts = {
        "children": len(children),
        "children_finished": len(done) - len(pruned),
        "children_pruned": len(pruned),
        "children_failed": sum(r.info.status == FAILED for r in children),
        "children_killed": sum(r.info.status == KILLED for r in children),
    }
    statuses = [
        (r.data.tags.get(CONFIG_HASH_TAG, r.info.run_id), r.info.status, r.info.start_time)
        for r in children
    ]
    outcome = parent_outcome(
        list(effective_statuses(statuses).values()),
        any_finished=bool(done),
        interrupted=interrupted,
        failed=failed,
        tolerate_failures=tolerate_failures,
    )
    # "sweep/..." keeps the counts in their own chart group, apart from the best metrics.
    metrics, best = {f"sweep/{k}": v for k, v in counts.items()}, None
    if done:
        run = best_child([r for r in done if r not in pruned] or done, key, objective)
        best = {"run_id": run.info.run_id, "value": run.data.metrics[key], **counts}
        metrics[key] = run.data.metrics[key]
        client.log_batch(parent_id, tags=_best_child_tags(run))
    client.log_batch(parent_id, metrics=summary_metrics(metrics))
    end_run(client, parent_id, outcome, parent.data.tags)
    return best


def _best_child_tags(run) -> list:
    """The best child's id, variant and model/optimizer/regularization params as tags."""
    from mlflow.entities import RunTag

    return [
        RunTag(f"{TAG}best_run_id", run.info.run_id),
        RunTag(f"{TAG}best_variant", run.data.tags.get(f"{TAG}variant", "")),
        *(
            RunTag(f"best_param.{k}"[:250], v[:8000])
            for k, v in run.data.params.items()
            if k.startswith(("optimizer.", "regularization.", "model."))
        ),
    ]
