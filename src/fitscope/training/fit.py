"""One Lightning fit of one run: the model, its callbacks and trainer, early stopping with
restore-best-weights, and the held-out test scores of the selected epoch.

It reports epochs to the sink it is given (anything with ``log_rows(rows)``: the pipeline
passes the MLflow run) and writes nothing but resume checkpoints; what a finished fit
leaves on disk and in MLflow is the pipeline's (fitscope.pipeline.outputs).
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.core.progress import LineProgress
from fitscope.model.metrics import constant_loss, test_curves, test_logits, test_scores
from fitscope.model.mlp import build_mlp_for, count_parameters
from fitscope.training.callbacks import (
    EpochHistory,
    EpochProgress,
    EpochRowSender,
    PeriodicCheckpoint,
    RestoreBestWeights,
    ReturnToMain,
)
from fitscope.training.module import FitModule
from fitscope.training.trainer import build_trainer

log = logging.getLogger(__name__)

# The typed config the schema returns (fitscope.pipeline.schema.TrainConfig: dataclasses,
# defined in the pipeline layer above this one, so named here by its shape only).
TrainConfig = Any


LAST_KEYS = ("loss", "acc", "auroc", "ece")  # scored again on the last epoch's weights


@dataclass
class FitResult:
    """What one fit found: the epoch history, the selected epoch and its scores."""

    history: EpochHistory  # one row of metrics an epoch
    selected: int  # the restored best epoch, or the last one without restore
    stopped: int
    early_stopped: bool
    wall_s: float
    model: Any  # the MLP on the CPU, eval mode, holding the selected epoch's weights
    scores: dict[str, float]  # held-out test metrics, and train_eval_loss
    last_scores: dict[str, float]  # the last trained epoch's test metrics (what ES bought)
    curves: dict[str, list]  # the test split's reliability bins, ROC and PR (binary)
    constant_val_loss: float  # a constant predictor's val loss (results.verdict: diverged)
    threads_at_end: int  # torch threads when the fit ended (callbacks.ShareIdleCores)
    train_rows: int  # rows (digits) it trained on: data.train_size, or the whole split

    @property
    def rows(self) -> list[dict[str, float]]:
        return self.history.rows

    @property
    def row(self) -> dict[str, float]:
        """The selected epoch's metrics."""
        return next(r for r in self.rows if r["epoch"] == self.selected)

    def summary(self) -> dict[str, float]:
        """The run's summary metrics, grouped by what they describe (so the MLflow UI draws
        them in sensible chart groups)."""
        row = self.row
        scores = {
            k.replace("train_eval_", "train_eval/") if k.startswith("train_") else f"test/{k}": v
            for k, v in self.scores.items()
        }
        return {
            "fit/best_epoch": self.selected,
            "fit/stopped_epoch": self.stopped,
            "fit/early_stopped": float(self.early_stopped),
            "fit/epochs_run": len(self.rows),
            "fit/wall_time_s": self.wall_s,
            "fit/constant_val_loss": self.constant_val_loss,
            "model/n_params": count_parameters(self.model),
            "data/train_rows": self.train_rows,
            **{f"best/{k}": v for k, v in row.items() if k.startswith(("train/", "val/"))},
            "best/gap_loss": row["val/loss"] - row["train/loss"],
            **scores,
            **{f"last_epoch/test/{k}": v for k, v in self.last_scores.items() if k in LAST_KEYS},
        }


@dataclass
class Watchers:
    """The callbacks whose state the result is read from (and the rest, in order)."""

    history: EpochHistory
    restore: RestoreBestWeights | None
    early: Any  # Lightning's EarlyStopping, or None
    callbacks: list[Any]


def fit_run(
    cfg: TrainConfig,
    dm,
    run_dir: Path,
    *,
    sink: Any = None,
    logged_through: int = -1,
    extra_callbacks: tuple = (),
    live_progress: bool | None = None,
    ckpt_dir: Path,
    precision: str,
    num_threads: int,
    resume_from: Path | None = None,
) -> FitResult:
    """Train ``cfg``'s model on ``dm``; epochs after ``logged_through`` go to ``sink``.

    ``cfg``: the typed config the schema returned (``schema.check``), not the raw DictConfig.

    ``live_progress``: False for plain progress lines (sweep workers share a terminal),
    None to decide by the terminal. ``resume_from``: a Lightning checkpoint to continue.
    """
    import pytorch_lightning as pl
    import torch

    torch.set_num_threads(num_threads)
    _quiet_lightning()
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    mlp = build_mlp_for(cfg.data, cfg.model, cfg.regularization, dm.num_features)
    module = _module(cfg, mlp, steps=len(dm.train_dataloader()))
    watch = _watchers(cfg, extra_callbacks, live_progress)
    if sink is not None:
        logger = cfg.logger
        sender = EpochRowSender(
            sink, watch.history, logger.flush_every, logged_through, every_s=logger.flush_every_s
        )
        watch.callbacks.append(sender)
    # What the result is read from (rank 0 sent the epochs to the sink itself).
    kept = {"history": watch.history, "restore": watch.restore, "early": watch.early}
    returned = ReturnToMain(
        run_dir / ".ddp_callbacks.pt", {k: v for k, v in kept.items() if v is not None}
    )
    # Last: the checkpoint saves the state the callbacks above have just updated.
    callbacks = [*watch.callbacks, returned, *_checkpoint(cfg, ckpt_dir)]
    trainer = _trainer(cfg, callbacks, precision, run_dir)
    wall = _fit(trainer, module, dm, cfg.trainer.strategy, num_threads, resume_from, returned)
    if not watch.history.rows:
        raise FitscopeError("training produced no epochs. Fix: check trainer.max_epochs")
    return _result(cfg, dm, mlp, trainer, watch, wall)


def _quiet_lightning() -> None:
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning-internal deprecation
    # Lightning's start-up banners (GPU available, tips) add nothing to our logs.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)


def _module(cfg: TrainConfig, mlp, steps: int) -> FitModule:
    reg = cfg.regularization
    return FitModule(
        mlp,
        task=cfg.data.task,
        num_classes=cfg.data.num_classes,
        l2=reg.l2,
        l2_include_output=reg.l2_include_output,
        optimizer=asdict(cfg.optimizer),
        scheduler=asdict(cfg.scheduler),
        steps_per_epoch=steps,
        monitor=cfg.callbacks.early_stopping.monitor,
    )


def _watchers(cfg: TrainConfig, extra: tuple, live_progress: bool | None) -> Watchers:
    """History, restore-best-weights, early stopping and the progress line, in that order
    (the progress line reads the best epoch and patience the two before it just set)."""
    from pytorch_lightning.callbacks import EarlyStopping

    es = cfg.callbacks.early_stopping
    history = EpochHistory()
    callbacks: list[Any] = [*extra, history]
    restore = None
    if es.restore_best_weights:
        restore = RestoreBestWeights(es.monitor, es.mode, es.min_delta)
    early = None
    if es.enabled:
        early = EarlyStopping(
            monitor=es.monitor,
            mode=es.mode,
            patience=es.patience,
            min_delta=es.min_delta,
            check_finite=False,
        )
    callbacks += [cb for cb in (restore, early) if cb is not None]
    if cfg.progress:
        line = LineProgress(
            f"{cfg.variant} seed {cfg.seed}", every_s=cfg.progress_every_s, live=live_progress
        )
        progress = EpochProgress(
            line,
            max_epochs=cfg.trainer.max_epochs,
            monitor=es.monitor,
            restore=restore,
            early=early,
        )
        callbacks.append(progress)
    return Watchers(history, restore, early, callbacks)


def checkpointing(cfg: TrainConfig) -> bool:
    """Whether the run writes resume checkpoints (``callbacks.checkpoint.every_*``)."""
    ckpt = cfg.callbacks.checkpoint
    return ckpt.every_s is not None or ckpt.every_epochs is not None


def _checkpoint(cfg: TrainConfig, ckpt_dir: Path) -> list[PeriodicCheckpoint]:
    """The resume checkpoint callback, when ``callbacks.checkpoint`` asks for one."""
    ckpt = cfg.callbacks.checkpoint
    if not checkpointing(cfg):
        return []
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    return [
        PeriodicCheckpoint(
            ckpt_dir / "last.ckpt", every_s=ckpt.every_s, every_epochs=ckpt.every_epochs
        )
    ]


def _trainer(cfg: TrainConfig, callbacks: list, precision: str, run_dir: Path):
    return build_trainer(
        callbacks,
        max_epochs=cfg.trainer.max_epochs,
        accelerator=cfg.trainer.accelerator,
        devices=cfg.trainer.devices,
        deterministic=cfg.trainer.deterministic,
        precision=precision,
        strategy=cfg.trainer.strategy,
        progress_bar=cfg.callbacks.progress_bar,
        root_dir=str(run_dir),
    )


def _fit(trainer, module, dm, strategy: str, threads: int, resume_from, returned) -> float:
    """Run ``trainer.fit``; its wall seconds. Under ``ddp_spawn`` the workers' callback
    state comes back to this process's callbacks afterwards."""
    import torch

    omp_before = os.environ.get("OMP_NUM_THREADS")
    if strategy == "ddp_spawn":
        # Spawned workers start fresh: torch reads its thread count from the environment.
        os.environ["OMP_NUM_THREADS"] = str(threads)
    returned.clear()  # only a file this fit writes is ever read back
    started = time.perf_counter()
    try:
        # weights_only: a resume checkpoint holds tensors and plain values only; nothing
        # in it is unpickled.
        ckpt_path = str(resume_from) if resume_from else None
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    except torch.multiprocessing.ProcessRaisedException as exc:
        # A DDP worker's error reaches this process as the text of its traceback: kept in
        # the log, and its last line (the error itself) becomes the run's one-line failure.
        log.error("a DDP worker failed:%s", exc)
        raise FitscopeError(f"a DDP worker failed: {str(exc).strip().splitlines()[-1]}") from None
    finally:  # the next job of a sweep in this process resolves `auto` afresh
        if omp_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp_before
    wall = time.perf_counter() - started
    returned.restore(spawned=strategy == "ddp_spawn")  # the workers' state
    return wall


def _last_epoch_scores(
    cfg: TrainConfig, dm, trainer, watch: Watchers, selected: int, scores: dict[str, float]
) -> dict[str, float]:
    """The test metrics of the last trained epoch's weights: the selected epoch's when it
    is the last, else scored on the weights the restore set aside (then the best again)."""
    restore, last = watch.restore, watch.history.rows[-1]["epoch"]
    if selected == last or restore is None or restore.last_state is None:
        return scores
    module = trainer.lightning_module
    module.load_state_dict(restore.last_state)
    try:
        task, classes = cfg.data.task, cfg.data.num_classes
        return test_scores(module.model.eval(), task, classes, dm.tensors["test"])
    finally:
        module.load_state_dict(restore.best_state)


def _result(cfg: TrainConfig, dm, mlp, trainer, watch: Watchers, wall: float) -> FitResult:
    import torch

    rows = watch.history.rows
    selected = rows[-1]["epoch"]
    if watch.restore is not None and watch.restore.best_epoch is not None:
        selected = watch.restore.best_epoch
    # The test split is scored here, by the process that trained, rather than by a stage
    # that would start Python and torch again only to reload the model (docs/pipeline.md);
    # on the device that trained it (Lightning moves the model back to the CPU after the
    # fit: one CPU thread took ~130 s for the 10.5M full-HIGGS rows that a GPU scores in
    # seconds), before the model is saved from the CPU.
    train_split = dm.mapped or dm.tensors["train"]  # mapped: the full HIGGS file
    task, test = cfg.data.task, dm.tensors["test"]
    scored = test_logits(mlp.to(trainer.strategy.root_device), task, test)  # one forward
    scores = test_scores(mlp, task, cfg.data.num_classes, test, train_split, scored)
    early = watch.early
    return FitResult(
        curves=test_curves(mlp, task, test, scored),
        last_scores=_last_epoch_scores(cfg, dm, trainer, watch, selected, scores),
        history=watch.history,
        selected=selected,
        stopped=rows[-1]["epoch"],
        early_stopped=early is not None and early.stopped_epoch > 0,
        wall_s=wall,
        model=mlp.to("cpu").eval(),
        scores=scores,
        constant_val_loss=constant_loss(train_split[1], dm.tensors["val"][1], cfg.data.num_classes),
        threads_at_end=torch.get_num_threads(),
        train_rows=len(train_split[1]),
    )
