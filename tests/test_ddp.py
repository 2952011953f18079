"""trainer=ddp_cpu: two processes (Lightning ddp_spawn, gloo on loopback) train like one."""

from __future__ import annotations

import json

import pytest
from conftest import compose, run_train, runs_of

from fitscope.pipeline.job import train
from fitscope.tracking.store import get_client

EPOCHS = 4
# Equivalence is checked in fp32: bf16-mixed rounds each product to 8 mantissa bits, and
# how a batch is split across ranks changes the order of those rounded sums (on a CPU with
# native bf16, trainer.precision=auto picks it: 0.704402 vs 0.704419 at 4 epochs).
FP32 = "trainer.precision=32-true"
# bf16 keeps 8 mantissa bits (relative step 2**-8 = 0.0039) but accumulates in fp32, so a
# different split moves the loss by far less than one bf16 step of it (0.7 * 0.0039).
BF16_LOSS_TOLERANCE = 0.7 * 2**-8


@pytest.mark.slow
def test_two_process_sweep_matches_one_process_and_logs_once(processed_dir, tmp_path, mlflow_uri):
    # A 2-job multirun under DDP: each job trains in 2 spawned processes; the sweep must not
    # be re-run by the workers (the trap of strategy=ddp), so exactly 2 jobs and 2 runs.
    sweep = tmp_path / "sweep"
    proc = run_train(
        [
            "-m",
            "trainer=ddp_cpu",
            FP32,
            f"trainer.max_epochs={EPOCHS}",
            "seed=0,1",
            "study=t_ddp",
            "logger.log_model=false",
            # A resume checkpoint every 2 epochs: every rank takes part, rank 0 writes.
            "callbacks.checkpoint.every_epochs=2",
            "callbacks.checkpoint.keep=true",
            f"callbacks.checkpoint.dir={tmp_path / 'ckpt'}",
            f"paths.data_dir={processed_dir}",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        mlflow_uri,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    client = get_client()
    parents, children = runs_of(client, "t_ddp")
    assert len(parents) == 1 and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert len(list((tmp_path / "ckpt").rglob("last.ckpt"))) == 2
    for child in children:
        # Rank 0 alone logs: one value per epoch, no duplicated steps.
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val/loss")]
        assert steps == list(range(EPOCHS))

    # The same training in one process (in this process): the same numbers within float
    # tolerance, because every batch is split across the ranks and the gradients averaged.
    one = compose(
        FP32,
        f"trainer.max_epochs={EPOCHS}",
        "logger=none",
        f"paths.data_dir={processed_dir}",
        f"paths.run_dir={tmp_path / 'one'}",
    )
    single = train(one)
    ddp = json.loads((sweep / "0" / "metrics.json").read_text())
    assert ddp["best_val_loss"] == pytest.approx(single, abs=1e-5)
    assert (
        ddp["best_epoch"]
        == json.loads((tmp_path / "one" / "metrics.json").read_text())["best_epoch"]
    )
    ddp_history = (sweep / "0" / "history.csv").read_text().splitlines()
    assert len(ddp_history) == EPOCHS + 1  # header + one row per epoch, from the workers
    seed0 = next(c for c in children if c.data.params["seed"] == "0")
    assert seed0.data.metrics["best/val/loss"] == pytest.approx(single, abs=1e-5)


@pytest.mark.slow
def test_two_process_bf16_matches_one_process_within_bf16_rounding(processed_dir, tmp_path):
    """bf16-mixed (native on AVX-512 BF16 CPUs, emulated elsewhere, so this runs on every
    machine): the split changes the rounding, not the training."""
    common = ["trainer.precision=bf16-mixed", f"trainer.max_epochs={EPOCHS}", "logger=none"]
    proc = run_train(
        [
            "trainer=ddp_cpu",
            *common,
            f"paths.data_dir={processed_dir}",
            f"paths.run_dir={tmp_path / 'ddp'}",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        tmp_path,
        f"sqlite:///{tmp_path / 'unused.db'}",
    )
    assert proc.returncode == 0, proc.stderr
    ddp = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert ddp["precision"] == "bf16-mixed"
    single = train(
        compose(*common, f"paths.data_dir={processed_dir}", f"paths.run_dir={tmp_path / 'one'}")
    )
    assert ddp["best_val_loss"] == pytest.approx(single, abs=BF16_LOSS_TOLERANCE)
