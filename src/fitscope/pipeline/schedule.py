"""The order a sweep starts its jobs in: longest first, so that the last core to finish is
not left with the longest job alone while the others stand idle (docs/pipeline.md).

A job's expected length is the wall time of the last FINISHED run of the same variant,
seed and profile in MLflow (the same config up to the code and data: how long early
stopping let it run); when some job has none, every job is ranked by its matmul work
instead: the epoch's FLOPs times ``trainer.max_epochs``. Each job seeds itself, so the
order changes no result; ties keep the order they came in.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig

from fitscope.data.splits import read_manifest
from fitscope.model.mlp import epoch_flop
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import tag_equals

log = logging.getLogger(__name__)


def run_epoch_flop(data: Mapping, model: Mapping, splits: Mapping) -> float:
    """The matmul FLOPs of one epoch of a run with config sections ``data`` and ``model``
    (a composed config's, or a saved one's) on the splits of its manifest."""
    return epoch_flop(
        splits["train"]["features"],
        1 if data["task"] == "binary" else data["num_classes"],
        model["width"],
        model["depth"],
        data["train_size"] or splits["train"]["rows"],
        splits["val"]["rows"],
    )


def work_flop(cfg: DictConfig) -> float:
    """The matmul FLOPs of ``cfg``'s run if it trains every epoch it may."""
    splits = read_manifest(cfg.data.dir)["splits"]
    return run_epoch_flop(cfg.data, cfg.model, splits) * cfg.trainer.max_epochs


def previous_seconds(client: Any, cfg: DictConfig) -> float | None:
    """The wall time of the last FINISHED run of ``cfg``'s variant, seed and profile."""
    experiment = client.get_experiment_by_name(cfg.study)
    if experiment is None:
        return None
    query = " and ".join(
        [
            tag_equals("fitscope.variant", cfg.variant),
            tag_equals("fitscope.profile", cfg.profile),
            f"params.seed = '{int(cfg.seed)}'",
            "attributes.status = 'FINISHED'",
        ]
    )
    runs = client.search_runs(
        [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0].data.metrics.get("fit/wall_time_s") if runs else None


def longest_first(
    jobs: list[list[str]], compose: Callable[[list[str]], DictConfig]
) -> list[list[str]]:
    """``jobs`` (each a list of overrides) ordered by expected length, longest first."""
    if len(jobs) < 2:
        return jobs
    try:
        configs = [compose(job) for job in jobs]
        work = [work_flop(cfg) for cfg in configs]
    except Exception as exc:  # a bad job is refused by the sweep's validation, not here
        log.info("jobs keep their order (%s)", exc)
        return jobs
    expected = work
    if configs[0].logger.name == "mlflow":
        try:
            client = get_client()
            seconds = [previous_seconds(client, cfg) for cfg in configs]
        except Exception as exc:  # an unreachable server: rank by work, train anyway
            log.info("no previous durations (%s)", exc)
            seconds = [None]
        if None not in seconds:
            expected = seconds
    order = sorted(range(len(jobs)), key=lambda i: -expected[i])  # stable: ties keep order
    return [jobs[i] for i in order]
