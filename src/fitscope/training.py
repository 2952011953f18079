"""The LightningModule, its metrics, and the callbacks that watch training."""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from torch import nn

from fitscope.errors import FitscopeError
from fitscope.fileio import atomic_path, write_csv
from fitscope.models import l2_penalty
from fitscope.progress import LineProgress, duration
from fitscope.scoring import classification_metrics, data_loss


class NonFiniteLossError(FitscopeError):
    """The training loss became NaN or infinite."""


class FitModule(pl.LightningModule):
    """Trains an MLP on binary (BCE) or multiclass (CE) targets with an optional L2 kernel penalty.

    Metrics are computed once per epoch from the collected outputs (no per-step
    logging), which keeps Lightning's overhead close to a plain loop.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str,
        num_classes: int,
        l2: float = 0.0,
        l2_include_output: bool = False,
        optimizer: dict[str, Any],
        scheduler: dict[str, Any],
        steps_per_epoch: int,
        monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        self.model = model
        self.task, self.num_classes = task, num_classes
        self.l2, self.l2_include_output = l2, l2_include_output
        self.optimizer_cfg, self.scheduler_cfg = optimizer, scheduler
        self.steps_per_epoch = steps_per_epoch
        self.monitor = monitor
        self._train_out: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_out: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._penalty_sum = torch.zeros(())
        self.epoch_metrics: dict[str, float] = {}
        # Manual optimization: one zero_grad/backward/step per batch. Lightning's
        # automatic closure machinery costs more than the whole step of a tiny MLP.
        self.automatic_optimization = False

    def __setattr__(self, name: str, value: Any) -> None:
        # Lightning sets `_current_fx_name` (a str or None) around every hook call, ~30
        # times per training step. nn.Module.__setattr__ would spend that time on
        # Parameter/Buffer/Module checks that a str cannot match; the result is the same.
        if name == "_current_fx_name" and (value is None or type(value) is str):
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning saves model, optimizer, scheduler and loop state, not the RNGs that
        # dropout draws from: without them a resumed run would diverge from an
        # uninterrupted one.
        checkpoint["fitscope_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["fitscope_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        rng = checkpoint.get("fitscope_rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def _shard(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of a batch (all of it in one process).

        Under DDP every rank iterates the same batches (same seed) and takes an equal slice
        of each: the averaged gradient is the whole batch's, so the protocol's batch size,
        step count and schedule stay those of one process.
        """
        world = self.trainer.world_size
        if world == 1:
            return batch
        rank = self.trainer.global_rank
        x, y = batch
        return torch.tensor_split(x, world)[rank], torch.tensor_split(y, world)[rank]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = self._shard(batch)
        # The LightningOptimizer wrapper (not the raw optimizer) so that its step counts
        # towards trainer.global_step, which step-based Lightning features rely on.
        optimizer = self.optimizers()
        logits = self.model(x)
        loss = data_loss(self.task, logits, y)
        self._train_out.append((logits.detach(), y))
        if self.l2:
            penalty = l2_penalty(self.model, self.l2, include_output=self.l2_include_output)
            self._penalty_sum = self._penalty_sum + penalty.detach()
            loss = loss + penalty
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = self._shard(batch)
        self._val_out.append((self.model(x), y))

    def on_validation_epoch_end(self) -> None:
        # Validation runs after every training epoch: both splits are summarised here so
        # every callback sees one complete row of metrics at `on_validation_end`.
        if self.trainer.sanity_checking:
            self._val_out.clear()
            return
        metrics = {f"val/{k}": v for k, v in self._summarise(self._val_out).items()}
        if self._train_out:
            n_batches = len(self._train_out)
            metrics.update({f"train/{k}": v for k, v in self._summarise(self._train_out).items()})
            if self.l2:  # without L2 it is an all-zero series: not logged at all
                metrics["train/l2_penalty"] = (self._penalty_sum / n_batches).item()
            metrics["optimizer/lr"] = self.trainer.optimizers[0].param_groups[0]["lr"]
            self._penalty_sum = torch.zeros(())
        # Set before the finiteness check: EpochHistory keeps the failing epoch's row.
        self.epoch_metrics = {"epoch": self.current_epoch, **metrics}
        if "train/loss" in metrics and not math.isfinite(metrics["train/loss"]):
            raise NonFiniteLossError(
                f"training loss became {metrics['train/loss']} in epoch {self.current_epoch}. "
                "Fix: lower optimizer.lr or the regularization strength"
            )
        # Only what callbacks monitor goes through self.log (it costs ~1 ms a key);
        # the full row is in `epoch_metrics` for EpochHistory.
        # Already global (gathered above): the sync is a mean of equal values across ranks.
        self.log(
            self.monitor,
            metrics[self.monitor],
            on_epoch=True,
            logger=False,
            sync_dist=self.trainer.world_size > 1,
        )

    def _summarise(self, outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        logits = torch.cat([o[0] for o in outputs]).float().cpu()
        targets = torch.cat([o[1] for o in outputs]).cpu()
        outputs.clear()
        if self.trainer.world_size > 1:
            # Every rank gets the outputs of all ranks and computes the same global metrics
            # (AUROC cannot be averaged over shards), so early stopping, the restored epoch
            # and what rank 0 logs agree across ranks. Objects: shards may differ by a row.
            shards: list[Any] = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(shards, (logits, targets))
            logits = torch.cat([sh[0] for sh in shards])
            targets = torch.cat([sh[1] for sh in shards])
        return classification_metrics(self.task, logits, targets, self.num_classes)

    def configure_optimizers(self):
        opt = self.optimizer_cfg
        if opt["name"] == "adam":
            optimizer = torch.optim.Adam(
                self.parameters(),
                lr=opt["lr"],
                betas=tuple(opt.get("betas", (0.9, 0.999))),
                eps=opt.get("eps", 1e-7),
            )
        else:
            optimizer = torch.optim.SGD(
                self.parameters(), lr=opt["lr"], momentum=opt.get("momentum", 0.0)
            )
        if self.scheduler_cfg["name"] == "none":
            return optimizer
        decay_steps = self.scheduler_cfg["decay_epochs"] * self.steps_per_epoch
        # Keras InverseTimeDecay: lr0 / (1 + step / decay_steps), updated every step.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 1.0 / (1.0 + step / decay_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


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


class EpochHistory(pl.Callback):
    """Collects one row of metrics per epoch and writes them as CSV (for `dvc plots`)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: FitModule) -> None:
        if not trainer.sanity_checking and pl_module.epoch_metrics:
            self.rows.append(dict(pl_module.epoch_metrics))

    def on_exception(
        self, trainer: pl.Trainer, pl_module: FitModule, exception: BaseException
    ) -> None:
        # Keep the row of the epoch that failed (e.g. a NaN loss) for the record.
        row = pl_module.epoch_metrics
        if row and (not self.rows or self.rows[-1]["epoch"] != row["epoch"]):
            self.rows.append(dict(row))

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(row) for row in state_dict["rows"]]

    def write_csv(self, path) -> None:
        if not self.rows:
            return
        columns = list(self.rows[0])
        write_csv(path, [columns, *([row.get(c, "") for c in columns] for row in self.rows)])


class MlflowEpochLogger(pl.Callback):
    """Sends the epoch history to a ``tracking.RunTracker`` in batches of ``every`` epochs."""

    def __init__(
        self, tracker, history: EpochHistory, every: int = 25, logged_through: int = -1
    ) -> None:
        self.tracker, self.history, self.every = tracker, history, every
        # Epochs up to this one are in MLflow already (a resumed run): never sent twice.
        self.logged_through = logged_through

    def _unsent(self) -> list[dict[str, float]]:
        return [row for row in self.history.rows if row["epoch"] > self.logged_through]

    def flush(self) -> None:
        rows = self._unsent()
        if rows:
            self.tracker.log_rows(rows)
            self.logged_through = int(rows[-1]["epoch"])

    # Every rank has the same global metrics; only rank 0 sends them (once).
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and len(self._unsent()) >= self.every:
            self.flush()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.flush()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.is_global_zero:
            self.flush()


class RestoreBestWeights(pl.Callback):
    """Keeps a copy of the weights of the best epoch and loads them when training ends.

    Lightning's EarlyStopping has no ``restore_best_weights``; this is that, with the
    same improvement rule (better than the best by more than ``min_delta``).
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min", min_delta: float = 0.0):
        self.monitor, self.mode, self.min_delta = monitor, mode, abs(min_delta)
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, value: float) -> bool:
        if self.best_score is None:
            return math.isfinite(value)
        if self.mode == "min":
            return value < self.best_score - self.min_delta
        return value > self.best_score + self.min_delta

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if self._improved(value):
            self.best_score, self.best_epoch = value, trainer.current_epoch
            self.best_state = copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.best_state is not None:
            pl_module.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.best_score, "epoch": self.best_epoch, "weights": self.best_state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state_dict["score"], state_dict["epoch"]
        self.best_state = state_dict["weights"]


class PeriodicCheckpoint(Checkpoint):
    """Saves a Lightning checkpoint to resume from, at the end of a training epoch.

    Every ``every_epochs`` epochs when set, else once ``every_s`` seconds have passed
    since the last save. As a ``Checkpoint`` callback Lightning runs it after every other
    callback's epoch end (early stopping included), as its own ModelCheckpoint, so the
    saved state is the whole epoch's. A kill during a save leaves the previous one intact.
    """

    def __init__(self, path, *, every_s: float | None = 30.0, every_epochs: int | None = None):
        self.path, self.every_s, self.every_epochs = str(path), every_s, every_epochs
        self.last_save = time.monotonic()
        self.saved = 0

    def _due(self, epoch: int) -> bool:
        if self.every_epochs:
            return (epoch + 1) % self.every_epochs == 0
        return self.every_s is not None and time.monotonic() - self.last_save >= self.every_s

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        due = self._due(trainer.current_epoch)
        if trainer.world_size > 1:
            # Under DDP every rank must call save_checkpoint (it ends in a barrier): rank 0's
            # clock decides for all.
            due = trainer.strategy.broadcast(due, src=0)
        if not due:
            return
        if not trainer.is_global_zero:
            trainer.save_checkpoint(self.path)  # writes nothing off rank 0; joins the barrier
            return
        # Lightning's own "atomic" save moves a file from $TMPDIR, which is a copy when that
        # is another filesystem: a temporary file beside the target, renamed, is atomic.
        with atomic_path(self.path) as tmp:
            trainer.save_checkpoint(tmp, weights_only=False)  # full state: resumable
        self.last_save = time.monotonic()
        self.saved += 1


class InterruptWatch(pl.Callback):
    """The epoch in progress (for the interrupt message), and a SIGTERM Lightning missed.

    Inside ``fit`` Lightning turns SIGTERM into ``SIGTERMException`` at the next batch or
    epoch boundary; a signal that lands after the last boundary would go unnoticed, so
    ``check`` (``lifecycle.JobGuard.check``) re-raises it when the fit ends.
    """

    def __init__(self, check: Callable[[], None]) -> None:
        self.check = check
        self.epoch: int | None = None  # None until training starts

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch = trainer.current_epoch

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.check()


class EpochProgress(pl.Callback):
    """The progress line of a run (``progress.LineProgress``), updated once per epoch.

    Per epoch, not per step: Lightning's own per-step bar costs more than a tiny model's
    step. Reads the best epoch and the patience left from the callbacks that own them, so
    it must come after them in the callback list.
    """

    def __init__(
        self,
        line: LineProgress,
        *,
        max_epochs: int,
        monitor: str,
        restore: RestoreBestWeights | None = None,
        early: Any = None,  # pytorch_lightning EarlyStopping, or None
    ) -> None:
        self.line, self.max_epochs, self.monitor = line, max_epochs, monitor
        self.restore, self.early = restore, early
        self.started: float | None = None
        self.first_epoch = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.started = time.monotonic()
        self.first_epoch = trainer.current_epoch  # > 0 when resumed

    def text(self, trainer: pl.Trainer, pl_module: FitModule) -> str:
        epoch = pl_module.epoch_metrics.get("epoch", trainer.current_epoch)
        done = int(epoch) + 1
        rate = (done - self.first_epoch) / max(time.monotonic() - (self.started or 0.0), 1e-9)
        parts = [f"epochs {done}/{self.max_epochs} done"]
        value = pl_module.epoch_metrics.get(self.monitor)
        if value is not None:
            parts.append(f"{self.monitor} {value:.4f}")
        if self.restore is not None and self.restore.best_score is not None:
            # The epoch index as in the logs and metrics.json (0-based).
            parts.append(f"best {self.restore.best_score:.4f} at epoch {self.restore.best_epoch}")
        left_epochs = self.max_epochs - done
        if self.early is not None:
            patience_left = max(self.early.patience - self.early.wait_count, 0)
            parts.append(f"patience {patience_left}/{self.early.patience}")
        parts.append(f"{rate:.3g} epochs/s")  # 3 digits: a full-HIGGS epoch takes minutes
        # An upper bound: early stopping may end the run sooner.
        parts.append(f"≤ {duration(left_epochs / rate if rate > 0 else -1)} left")
        return ", ".join(parts)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: FitModule) -> None:
        if not trainer.sanity_checking and pl_module.epoch_metrics and self.line.due():
            self.line.show(self.text(trainer, pl_module))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: FitModule) -> None:
        if self.line.live and pl_module.epoch_metrics:  # leave the final state on screen
            self.line.show(self.text(trainer, pl_module), force=True)
        self.line.close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self.line.close()  # the error message starts on a line of its own


class ReturnToMain(pl.Callback):
    """Brings the state of callbacks back from spawned DDP processes to this process.

    Under ``ddp_spawn`` the callbacks train in copies inside the workers; Lightning returns
    only rank 0's final weights and ``callback_metrics``. Rank 0 saves the ``state_dict`` of
    each named callback (the same state a resume checkpoint keeps) when the fit ends, and
    :meth:`restore` loads it into this process's objects.

    The file lies in the run directory, which a user (or a DVC-tracked output) may hand
    us, so it is trusted only when this very fit wrote it: :meth:`clear` removes any file
    left there before the fit, :meth:`restore` reads nothing unless the fit was a
    multi-process one, and it loads tensors and plain containers only (``weights_only``):
    a pickled object planted there can never run code.
    """

    def __init__(self, path, callbacks: dict[str, pl.Callback]) -> None:
        self.path, self.callbacks = str(path), callbacks

    def clear(self) -> None:
        """Remove a file left by an earlier fit (called before every fit)."""
        Path(self.path).unlink(missing_ok=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1 and trainer.is_global_zero:
            states = {name: cb.state_dict() for name, cb in self.callbacks.items()}
            with atomic_path(self.path) as tmp:
                torch.save(states, tmp)

    def restore(self, spawned: bool) -> None:
        """Load what rank 0 saved (after ``trainer.fit`` returned in this process).

        ``spawned``: the fit ran in spawned DDP workers. In one process the callbacks here
        are the ones that trained, and nothing is read.
        """
        if not spawned:
            return
        try:
            states = torch.load(self.path, weights_only=True)
        except FileNotFoundError:
            raise FitscopeError(
                f"the DDP workers ended without returning their state ({self.path}). "
                "Fix: see the run's log for the worker's error"
            ) from None
        for name, cb in self.callbacks.items():
            cb.load_state_dict(states[name])
        os.unlink(self.path)
