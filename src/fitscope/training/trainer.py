"""The Lightning Trainer as every fitscope run builds it (no logger, no per-step work)."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint


def build_trainer(
    callbacks: list[pl.Callback],
    *,
    max_epochs: int,
    accelerator: str = "cpu",
    devices: int | str = 1,
    deterministic: bool = True,
    precision: str = "32-true",
    strategy: str = "auto",
    progress_bar: bool = False,
    root_dir: str | None = None,
) -> pl.Trainer:
    """The Trainer every fit uses (training and the benchmark).

    Metrics reach MLflow and the CSV through our callbacks, not Lightning's logger;
    no checkpoints, model summary or sanity validation, each of which costs time.
    ``strategy=ddp_spawn`` trains in ``devices`` spawned processes (gloo on CPU, NCCL on
    GPU) while this process waits: see :class:`ReturnToMain`.
    """
    if strategy == "ddp_spawn" and accelerator == "cpu":
        # Lightning hands RNG states to the workers as shared tensors; torch's default
        # (file descriptors) failed to map them in the workers here ("unable to resize file").
        torch.multiprocessing.set_sharing_strategy("file_system")
    return pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        # Per-rank batch statistics would make a batchnorm model differ from one process.
        sync_batchnorm=strategy != "auto",
        max_epochs=max_epochs,
        deterministic=deterministic,
        precision=precision,
        callbacks=callbacks,
        logger=False,
        # Only our own checkpoint callback (resume), never Lightning's default one.
        enable_checkpointing=any(isinstance(cb, Checkpoint) for cb in callbacks),
        enable_progress_bar=progress_bar,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10**9,
        default_root_dir=root_dir,
    )
