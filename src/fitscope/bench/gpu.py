"""GPU training throughput (``--gpu``): rows per second of the large model in each
precision, on a lent GPU machine (scripts/gpu_check.sh).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fitscope.bench.loops import bench_module
from fitscope.training.callbacks import EpochHistory
from fitscope.training.datamodule import TensorBatches
from fitscope.training.trainer import build_trainer


def gpu_throughput(
    rows: int, batch_size: int, precision: str, epochs: int = 2, device: str = "cuda"
) -> dict:
    """Training rows/s of the large 512x4 model on synthetic HIGGS-shaped data on the GPU.

    The real FitModule and Trainer (every run's), data resident on the GPU; the first
    epoch (CUDA start-up, kernel selection) is excluded from the timing. ``device="cpu"``
    runs the same path on the CPU (``--smoke``).
    """
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    import pytorch_lightning as pl

    class EpochTimes(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            sync()
            self.marks.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            sync()
            self.marks.append(time.perf_counter())

    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(rows, 28, device=device, generator=gen)
    y = (x[:, :3].sum(1) + 0.5 * torch.randn(rows, device=device, generator=gen) > 0).float()
    n_val = max(rows // 20, batch_size)

    class GpuData(pl.LightningDataModule):
        def train_dataloader(self):
            return TensorBatches(x[n_val:], y[n_val:], batch_size, shuffle=True)

        def val_dataloader(self):
            return TensorBatches(x[:n_val], y[:n_val], batch_size, shuffle=False)

    torch.manual_seed(0)
    steps = -(-(rows - n_val) // batch_size)
    module = bench_module(512, 4, steps)
    timer = EpochTimes()
    trainer = build_trainer(
        [timer, EpochHistory()],
        max_epochs=epochs,
        accelerator="gpu" if device == "cuda" else "cpu",
        deterministic=False,
        precision=precision,
    )
    trainer.fit(module, datamodule=GpuData())
    seconds = timer.marks[-1] - timer.marks[-2]  # the last epoch's training part
    return {
        "rows": rows - n_val,
        "batch_size": batch_size,
        "precision": precision,
        "epoch_s": seconds,  # training + validation + epoch metrics
        "rows_per_s": (rows - n_val) / seconds,
    }


def gpu_main(out: Path | None, rows: int) -> None:
    """GPU figures for docs/benchmarks.md (run on a machine with a CUDA GPU)."""

    name = torch.cuda.get_device_name(0)
    results = {"device": name, "torch": torch.__version__, "runs": []}
    for batch_size in (500, 8192):
        for precision in ("32-true", "bf16-mixed"):
            result = gpu_throughput(rows, batch_size, precision)
            results["runs"].append(result)
            print(
                f"{name}: 512x4 MLP, {result['rows']} rows, batch {batch_size}, {precision}: "
                f"{result['rows_per_s']:,.0f} rows/s ({result['epoch_s']:.2f} s/epoch)",
                flush=True,
            )
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")
