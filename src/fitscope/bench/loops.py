"""Training-loop figures: a Lightning epoch of the tiny and the large HIGGS model against a
plain PyTorch loop doing the same work, Lightning's floor, batch iteration, dropout,
the matmul peak, bf16 against fp32, and what progress lines and checkpoints cost.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from fitscope.bench.load import LOAD_ROW, tracking_seconds
from fitscope.core.progress import LineProgress
from fitscope.data.higgs import fetch_higgs, split_higgs
from fitscope.data.params import HiggsParams
from fitscope.model.metrics import classification_metrics, data_loss
from fitscope.model.mlp import FastDropout, build_mlp, epoch_flop
from fitscope.training.callbacks import (
    EpochHistory,
    EpochProgress,
    PeriodicCheckpoint,
    RestoreBestWeights,
)
from fitscope.training.datamodule import ArrayDataModule, TensorBatches
from fitscope.training.module import FitModule, build_optimizer
from fitscope.training.precision import cpu_has_native_bf16
from fitscope.training.trainer import build_trainer

OPT = {"name": "adam", "lr": 1e-3, "eps": 1e-7}
SCHED = {"name": "inverse_time", "decay_epochs": 1000}


def embedded_higgs(tmp: Path) -> ArrayDataModule:
    params = HiggsParams()
    fetch_higgs(params, tmp / "raw")
    split_higgs(params, tmp / "raw", tmp / "higgs")
    dm = ArrayDataModule(tmp / "higgs", task="binary", batch_size=500)
    dm.setup()
    return dm


def plain_loop(
    dm: ArrayDataModule, epochs: int, seed: int = 0, width: int = 16, depth: int = 1
) -> float:
    """Seconds for ``epochs`` epochs of a hand-written loop doing FitModule's work."""
    torch.manual_seed(seed)
    model = build_mlp(28, 1, width=width, depth=depth)
    optimizer = build_optimizer(list(model.parameters()), OPT)
    steps = len(dm.train_dataloader())
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 / (1.0 + step / (SCHED["decay_epochs"] * steps))
    )
    train_batches, val_batches = dm.train_dataloader(), dm.val_dataloader()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        outs = []
        for x, y in train_batches:
            logits = model(x)
            loss = data_loss("binary", logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            outs.append((logits.detach(), y))
        model.eval()
        with torch.no_grad():
            vals = [(model(x), y) for x, y in val_batches]
        for batch in (outs, vals):
            classification_metrics(
                "binary", torch.cat([o[0] for o in batch]), torch.cat([o[1] for o in batch]), 2
            )
    return time.perf_counter() - start


class EmptySteps(FitModule):
    """FitModule with training and validation steps that do nothing: what is left of an
    epoch is Lightning's own loop, hook and callback machinery (plus batch iteration)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        return None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        return None

    def on_validation_epoch_end(self) -> None:
        self.log(self.monitor, 0.0, on_epoch=True, logger=False)


def iterate_only(dm: ArrayDataModule, epochs: int) -> float:
    """Seconds to iterate the training and validation batches ``epochs`` times."""
    train_batches, val_batches = dm.train_dataloader(), dm.val_dataloader()
    start = time.perf_counter()
    for _ in range(epochs):
        for batches in (train_batches, val_batches):
            for _batch in batches:
                pass
    return time.perf_counter() - start


def bench_module(
    width: int, depth: int, steps_per_epoch: int, module_cls: type[FitModule] = FitModule
) -> FitModule:
    """The FitModule training uses, on a binary HIGGS-shaped MLP (Adam, inverse-time decay)."""
    return module_cls(
        build_mlp(28, 1, width=width, depth=depth),
        task="binary",
        num_classes=2,
        optimizer=OPT,
        scheduler=SCHED,
        steps_per_epoch=steps_per_epoch,
    )


def lightning_loop(
    dm: ArrayDataModule,
    epochs: int,
    seed: int = 0,
    module_cls: type[FitModule] = FitModule,
    width: int = 16,
    depth: int = 1,
    precision: str = "32-true",
) -> float:
    """Seconds for ``epochs`` epochs of ``module_cls`` under the Trainer train.py builds."""
    from pytorch_lightning.callbacks import EarlyStopping

    torch.manual_seed(seed)
    module = bench_module(width, depth, len(dm.train_dataloader()), module_cls)
    callbacks = [
        EpochHistory(),
        RestoreBestWeights(),
        EarlyStopping(monitor="val/loss", patience=10**6, check_finite=False),
    ]
    trainer = build_trainer(callbacks, max_epochs=epochs, precision=precision)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


def default_dataloader_epoch(dm: ArrayDataModule, repeats: int) -> tuple[float, float]:
    """Seconds to iterate the training split: tensor slices vs a default DataLoader."""
    x, y = dm.tensors["train"]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=500, shuffle=True
    )
    fast = TensorBatches(x, y, 500, shuffle=True)
    timings = []
    for batches in (fast, loader):
        start = time.perf_counter()
        for _ in range(repeats):
            for _batch in batches:
                pass
        timings.append(time.perf_counter() - start)
    return timings[0], timings[1]


def dropout_step(dropout: nn.Module, repeats: int) -> float:
    """Seconds for forward+backward of the 512x4 model with the given dropout module."""
    torch.manual_seed(0)
    model = build_mlp(28, 1, width=512, depth=4, dropout=0.5)
    layers = [dropout if isinstance(m, FastDropout) else m for m in model]
    model = nn.Sequential(*layers).train()
    x, y = torch.randn(500, 28), torch.randint(0, 2, (500,)).float()
    start = time.perf_counter()
    for _ in range(repeats):
        data_loss("binary", model(x), y).backward()
    return time.perf_counter() - start


def checkpoint_save_seconds(dm: ArrayDataModule, tmp: Path, saves: int = 5) -> float:
    """Median seconds of one resume checkpoint of the large 512x4 model (train.py's Trainer)."""

    module = bench_module(512, 4, len(dm.train_dataloader()))
    callbacks = [EpochHistory(), RestoreBestWeights(), PeriodicCheckpoint(tmp / "c.ckpt")]
    trainer = build_trainer(callbacks, max_epochs=2)
    trainer.fit(module, datamodule=dm)
    callbacks[1].last_state = None  # set aside at the fit's end only: no periodic one has it
    timings = []
    for _ in range(saves):
        start = time.perf_counter()
        trainer.save_checkpoint(tmp / "last.ckpt", weights_only=False)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def progress_seconds_per_epoch(epochs: int = 2000) -> float:
    """What ``EpochProgress`` costs an epoch at worst: a line built and written every epoch
    (a terminal redraws at most once a second, a pipe every ``progress_every_s``)."""

    line = LineProgress("bench", every_s=0.0, stream=io.StringIO(), live=False)
    restore = RestoreBestWeights()
    restore.best_score, restore.best_epoch = 0.61, 3
    callback = EpochProgress(line, max_epochs=10**4, monitor="val/loss", restore=restore)
    trainer = SimpleNamespace(current_epoch=0, sanity_checking=False)
    module = SimpleNamespace(epoch_metrics={"epoch": 0, "val/loss": 0.62})
    callback.on_train_start(trainer, module)
    started = time.perf_counter()
    for epoch in range(epochs):
        module.epoch_metrics["epoch"] = epoch
        callback.on_validation_end(trainer, module)
    return (time.perf_counter() - started) / epochs


def epoch_gflop(dm: ArrayDataModule, width: int, depth: int) -> float:
    """GFLOP of one training epoch plus validation of a ``width`` x ``depth`` binary MLP."""
    rows, val_rows = len(dm.tensors["train"][1]), len(dm.tensors["val"][1])
    return epoch_flop(dm.num_features, 1, width, depth, rows, val_rows) / 1e9


def matmul_peak_gflops(
    width: int = 512, batch: int = 500, repeats: int = 200, precision: str = "32-true"
) -> float:
    """GFLOP/s of the large model's dominant product (batch x width @ width x width), the
    best of 5 runs: what this core reaches on exactly these shapes, in float32 or, for
    ``bf16-mixed``, in bfloat16 (what autocast multiplies in)."""
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float32
    a, b = torch.randn(batch, width, dtype=dtype), torch.randn(width, width, dtype=dtype)
    for _ in range(20):
        a @ b
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * batch * width * width * repeats / best / 1e9


def precision_step_seconds(precision: str, steps: int = 6, width: int = 512) -> float:
    """Median seconds of one training step (batch 500, forward + backward + Adam) of the
    512x4 model under Lightning's CPU autocast for ``precision``."""
    torch.manual_seed(0)
    model = build_mlp(28, 1, width=width, depth=4)
    optimizer = build_optimizer(list(model.parameters()), {"name": "adam", "lr": 1e-3})
    x, y = torch.randn(500, 28), torch.randint(0, 2, (500,)).float()
    bf16 = precision == "bf16-mixed"
    timings = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = data_loss("binary", model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[1:])


# The large variant of the classic study trains 221 epochs (docs/results/classic).
LARGE_STUDY_EPOCHS = 221


def bench_large(
    dm: ArrayDataModule,
    epochs: int,
    rounds: int,
    tmp: Path,
    tracked_epochs: int = LARGE_STUDY_EPOCHS,
) -> dict[str, Any]:
    """The figures of the large 512x4 model (see the module docstring); its tracking cost
    is that of a run of ``tracked_epochs`` epochs."""

    lightning_loop(dm, 1, width=512, depth=4)  # warm-up
    plain, light = [], []
    for _ in range(rounds):  # interleaved, so drift hits both sides alike
        plain.append(plain_loop(dm, epochs, width=512, depth=4))
        light.append(lightning_loop(dm, epochs, width=512, depth=4))
    epoch_s = min(light) / epochs
    gflops = epoch_gflop(dm, 512, 4) / epoch_s
    peak = matmul_peak_gflops()
    fp32 = precision_step_seconds("32-true")
    bf16 = precision_step_seconds("bf16-mixed")
    tracked = tracking_seconds(tmp, tracked_epochs)
    save = checkpoint_save_seconds(dm, tmp)
    return {
        "large_lightning_over_plain": statistics.median(
            b / a for a, b in zip(plain, light, strict=True)
        ),
        "large_epoch_s": epoch_s,
        "large_gflops": gflops,
        "matmul_peak_gflops": peak,
        "large_efficiency": gflops / peak,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "bf16_over_fp32_speed": fp32 / bf16,
        "tracking_overhead": tracked / (tracked_epochs * epoch_s),
        "checkpoint_overhead": save / CHECKPOINT_EVERY_S,
        **(large_bf16_figures(dm, epochs, rounds) if cpu_has_native_bf16() else {}),
    }


def large_bf16_figures(dm: ArrayDataModule, epochs: int, rounds: int) -> dict[str, float]:
    """The 512x4 Lightning epoch in bf16-mixed, what the study trains in on a CPU with
    native bf16, against the bf16 matmul peak: the part of the study's floor ratio that
    no scheduling can remove (issue 22)."""
    runs = (
        lightning_loop(dm, epochs, width=512, depth=4, precision="bf16-mixed")
        for _ in range(rounds)
    )
    epoch_s = min(runs) / epochs
    peak = matmul_peak_gflops(precision="bf16-mixed")
    return {
        "large_bf16_epoch_s": epoch_s,
        "large_bf16_efficiency": epoch_gflop(dm, 512, 4) / epoch_s / peak,
    }


def bench_tiny(dm: ArrayDataModule, epochs: int, rounds: int) -> dict[str, Any]:
    """The tiny model vs a plain loop and Lightning's floor (printed as before)."""
    plain_loop(dm, 3)  # warm-up every path
    lightning_loop(dm, 3)
    lightning_loop(dm, 3, module_cls=EmptySteps)
    plain, light, floor, iterate = [], [], [], []
    for _ in range(rounds):  # interleaved, so drift hits every side alike
        plain.append(plain_loop(dm, epochs))
        light.append(lightning_loop(dm, epochs))
        floor.append(lightning_loop(dm, epochs, module_cls=EmptySteps))
        iterate.append(iterate_only(dm, epochs))
    fast, default = default_dataloader_epoch(dm, 50)
    p, li = statistics.median(plain), statistics.median(light)
    fl, it = statistics.median(floor), statistics.median(iterate)
    ratios = sorted(b / a for a, b in zip(plain, light, strict=True))
    # Best any per-batch LightningModule could reach: the plain loop plus Lightning's
    # floor, minus the batch iteration that both already contain.
    best = sorted((a + f - i) / a for a, f, i in zip(plain, floor, iterate, strict=True))
    print(f"tiny HIGGS model, {epochs} epochs x {rounds} interleaved rounds, 1 thread:")
    print(f"  plain torch loop   {1000 * p / epochs:7.2f} ms/epoch (median)")
    print(f"  Lightning loop     {1000 * li / epochs:7.2f} ms/epoch (median)")
    print(
        f"  ratio Lightning / plain: median of rounds {statistics.median(ratios):.2f}x, "
        f"best-of-each {min(light) / min(plain):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x"
    )
    print(f"  Lightning floor  {1000 * fl / epochs:7.2f} ms/epoch (same Trainer, no-op steps)")
    print(f"  batch iteration  {1000 * it / epochs:7.2f} ms/epoch (no work at all)")
    print(
        f"  lowest reachable ratio, (plain + floor - iteration) / plain: "
        f"median {statistics.median(best):.2f}x, range {best[0]:.2f}-{best[-1]:.2f}x"
    )
    print(f"  default DataLoader / tensor batches (iteration only) = {default / fast:.1f}x")
    cost = progress_seconds_per_epoch()
    print(
        f"  progress line, written every epoch (worst case): {1e6 * cost:.0f} us an epoch = "
        f"{100 * cost * epochs / li:.2f}% of a tiny-model Lightning epoch (goal <= 1%)"
    )
    nn_drop = statistics.median(dropout_step(nn.Dropout(0.5), 20) for _ in range(3))
    fast_drop = statistics.median(dropout_step(FastDropout(0.5), 20) for _ in range(3))
    print(f"  512x4 fwd+bwd: nn.Dropout / FastDropout = {nn_drop / fast_drop:.2f}x")
    return {
        "tiny_lightning_over_plain": statistics.median(ratios),
        "tiny_floor_over_plain": statistics.median(best),
        "tiny_lightning_over_floor": statistics.median(ratios) / statistics.median(best),
    }


CHECKPOINT_EVERY_S = 30.0  # conf/callbacks/default.yaml: callbacks.checkpoint.every_s


def report_checkpoint_cost(dm: ArrayDataModule, tmp: Path) -> None:
    """Resume checkpoints cost one save per ``callbacks.checkpoint.every_s`` of training."""

    every_s = CHECKPOINT_EVERY_S
    save = checkpoint_save_seconds(dm, tmp)
    print(
        f"  resume checkpoint of the 512x4 model: {1000 * save:.0f} ms a save; at one save per "
        f"{every_s:.0f} s of training (the default) that is {100 * save / every_s:.2f}% "
        "of training time (goal <= 1%)"
    )


LOAD_ROW |= {"train/acc": 0.6, "train/auroc": 0.7, "train/l2_penalty": 0.0, "lr": 1e-3}
