"""How runs end, decided in one place (fitscope.tracking.outcomes): pure decisions,
tested without MLflow, and end_run against a real SQLite store."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from fitscope.pipeline.sweep_callback import interrupt_message, sweep_failure
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.outcomes import (
    FAILED,
    FINISHED,
    KILLED,
    Outcome,
    best_child,
    effective_statuses,
    end_run,
    parent_outcome,
)
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import FAILURE_TAG


def test_a_config_counts_finished_if_any_run_finished_else_its_newest_runs_status():
    runs = [
        ("a", FAILED, 1),
        ("a", FINISHED, 2),
        ("a", KILLED, 3),
        ("b", FAILED, 5),
        ("b", KILLED, 4),
    ]
    assert effective_statuses(runs) == {"a": FINISHED, "b": FAILED}


@pytest.mark.parametrize(
    ("effective", "flags", "expected"),
    [
        ([FINISHED], {}, Outcome(FINISHED)),
        ([FINISHED, KILLED], {}, Outcome(KILLED, "1 config(s) ended KILLED")),
        ([FINISHED], {"interrupted": True}, Outcome(KILLED, "the sweep was interrupted")),
        ([FINISHED], {"failed": True}, Outcome(FAILED, "the sweep failed (see its output)")),
        ([FAILED], {"any_finished": False}, Outcome(FAILED, "no child run finished")),
        ([FINISHED, FAILED, FAILED], {}, Outcome(FAILED, "2 config(s) failed")),
        ([FINISHED, FAILED], {"tolerate_failures": True}, Outcome(FINISHED)),  # a search
        # An interrupt outranks a killed config, which outranks the sweep's own failure.
        (
            [KILLED],
            {"interrupted": True, "failed": True},
            Outcome(KILLED, "the sweep was interrupted"),
        ),
        ([KILLED], {"failed": True}, Outcome(KILLED, "1 config(s) ended KILLED")),
    ],
)
def test_a_sweep_parent_ends_by_the_stated_rule(effective, flags, expected):
    assert parent_outcome(effective, **{"any_finished": True, **flags}) == expected


def test_the_best_child_is_the_lowest_loss_or_the_highest_score():
    runs = [
        SimpleNamespace(id=i, data=SimpleNamespace(metrics={"best/m": v}))
        for i, v in enumerate([0.5, 0.2, 0.9])
    ]
    assert best_child(runs, "best/m", "val/loss").id == 1
    assert best_child(runs, "best/m", "val/acc").id == 2


def test_an_outcome_has_a_reason_exactly_when_it_is_not_finished():
    with pytest.raises(ValueError, match="FINISHED, FAILED or KILLED"):
        Outcome("RUNNING")
    with pytest.raises(ValueError, match="has no failure reason"):
        Outcome(FINISHED, "why")
    with pytest.raises(ValueError, match="has no failure reason"):
        Outcome(KILLED)


def test_end_run_records_the_reason_and_clears_a_stale_one(mlflow_uri):
    client = get_client(mlflow_uri)
    exp = ensure_experiment(client, "t_outcomes")
    run_id = client.create_run(exp).info.run_id
    end_run(client, run_id, Outcome(KILLED, "interrupted (SIGINT) at epoch 3"))
    run = client.get_run(run_id)
    assert run.info.status == KILLED
    assert run.data.tags[FAILURE_TAG] == "interrupted (SIGINT) at epoch 3"
    client.update_run(run_id, status="RUNNING")  # resumed, then finished
    end_run(client, run_id, Outcome(FINISHED), run.data.tags)
    run = client.get_run(run_id)
    assert run.info.status == FINISHED and FAILURE_TAG not in run.data.tags


def test_a_sweeps_exit_line_is_decided_from_its_failed_jobs():
    failed = ["3\thiggs-l2\tinterrupted at epoch 7", "5\thiggs-tiny\tValueError: x"]
    line = interrupt_message("SIGINT", failed)
    assert line == (
        "interrupted (SIGINT); runs KILLED: job 3 higgs-l2 at epoch 7; "
        "run the same command again to resume (finished runs are kept, interrupted ones "
        "continue from their last checkpoint)"
    )
    where = Path("multirun/x/failed_jobs.tsv")
    plain = sweep_failure(failed, where, search=False, parents=["p"], judged=True)
    assert plain.startswith("fitscope: error: 2 job(s) of the sweep failed (higgs-l2, higgs-tiny)")
    assert sweep_failure([], where, search=False, parents=["p"], judged=False) is None
    # A search tolerates failed trials; it fails only when no trial finished.
    assert sweep_failure(failed, where, search=True, parents=["p"], judged=True) is None
    none_done = sweep_failure(failed, where, search=True, parents=["p"], judged=False)
    assert none_done.startswith(
        "fitscope: error: every job of the sweep failed (MLflow parent run p"
    )


def test_logging_the_model_does_not_end_the_run(mlflow_uri):
    """Only end_run ends a run: logging the model (the step before it) leaves it RUNNING,
    with the model in the run's own experiment, found by its run."""
    import numpy as np

    from fitscope.model.mlp import ProbabilityModel, build_mlp
    from fitscope.tracking.run import RunTracker

    client = get_client(mlflow_uri)
    exp = ensure_experiment(client, "t_log_model")
    tracker = RunTracker.create(client, exp, "m", {}, {})
    model = ProbabilityModel(build_mlp(3, 1, width=4, depth=1), "binary")
    info = tracker.log_model(model, np.zeros((2, 3), dtype=np.float32), step=0)
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    found = client.search_logged_models([exp], filter_string=f"source_run_id = '{tracker.run_id}'")
    assert [m.model_id for m in found] == [info.model_id]
    tracker.finish()
    assert client.get_run(tracker.run_id).info.status == FINISHED
