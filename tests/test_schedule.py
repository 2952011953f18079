"""A train stage starts its longest jobs first (fitscope.pipeline.schedule): by the last
run's wall time where every job has one, else by matmul work. Nothing here is timed."""

from __future__ import annotations

from conftest import compose

from fitscope.pipeline.schedule import longest_first, work_flop
from fitscope.tracking.store import get_client

JOBS = [
    ["model=tiny", "variant=t"],
    ["model=large", "variant=l"],
    ["model=medium", "variant=m"],
    ["model=large", "regularization=dropout", "variant=d"],
]


def composer(processed_dir, *extra: str):
    return lambda job: compose(*job, f"paths.data_dir={processed_dir}", *extra)


def test_jobs_without_a_history_start_by_their_matmul_work(processed_dir, mlflow_uri):
    ordered = longest_first(JOBS, composer(processed_dir))
    # large and large+dropout do the same work: they keep their order (stable).
    assert [job[-1] for job in ordered] == ["variant=l", "variant=d", "variant=m", "variant=t"]
    large = work_flop(composer(processed_dir)(JOBS[1]))
    # 512x4 on 28 features: 2 x 803,328 multiply-adds x (3 x 8,984 + 1,000) rows x 10,000
    # epochs (conf/trainer/cpu.yaml's max_epochs).
    macs = 28 * 512 + 3 * 512 * 512 + 512
    assert large == 2 * macs * (3 * 8984 + 1000) * 10_000


def test_jobs_with_a_history_start_by_their_last_wall_time(processed_dir, mlflow_uri):
    client = get_client(mlflow_uri)
    experiment = client.create_experiment("adhoc")
    seconds = {"t": 300.0, "l": 20.0, "m": 10.0, "d": 200.0}  # tiny took longest, say
    for variant, wall in seconds.items():
        run = client.create_run(
            experiment, tags={"fitscope.variant": variant, "fitscope.profile": "adhoc"}
        )
        client.log_param(run.info.run_id, "seed", "0")
        client.log_metric(run.info.run_id, "fit/wall_time_s", wall)
        client.set_terminated(run.info.run_id, "FINISHED")
    ordered = longest_first(JOBS, composer(processed_dir))
    assert [job[-1] for job in ordered] == ["variant=t", "variant=d", "variant=l", "variant=m"]

    # One job without a history: every job is ranked by work instead.
    new = [*JOBS, ["model=small", "variant=s"]]
    assert [job[-1] for job in longest_first(new, composer(processed_dir))][:2] == [
        "variant=l",
        "variant=d",
    ]
    # Another seed has no history either.
    other_seed = composer(processed_dir, "seed=1")
    assert longest_first(JOBS, other_seed)[0][-1] == "variant=l"


def test_the_last_jobs_of_a_sweep_take_the_idle_cores(tmp_path):
    from fitscope.training.threads import shared_threads

    # 8 cores, 4 jobs at once: 2 threads each while 4 or more remain, then the share grows.
    assert [shared_threads(8, 4, remaining, 2) for remaining in (9, 4, 3, 2, 1, 0)] == [
        2,
        2,
        2,
        4,
        8,
        8,
    ]
    assert shared_threads(8, 4, 1, 16) == 16  # never fewer than it has


def test_the_hand_over_sets_torchs_threads_at_an_epoch_start(tmp_path):
    import torch

    from fitscope.training.callbacks import ShareIdleCores

    done = tmp_path / "jobs_done"
    callback = ShareIdleCores(done, total=3, at_once=2, cores=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        callback.on_train_epoch_start(None, None)  # no job done: 3 remain, 2 run
        assert torch.get_num_threads() == 1
        done.write_bytes(b"..")  # two jobs done: this one runs alone
        callback.on_train_epoch_start(None, None)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
