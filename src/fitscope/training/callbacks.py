"""Lightning callbacks that watch a fit: the epoch history and its sink, restoring the best
weights, resume checkpoints, interrupts, the progress line, and returning DDP state.
"""

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

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import atomic_path, write_csv
from fitscope.core.progress import LineProgress, duration
from fitscope.training.module import FitModule
from fitscope.training.threads import shared_threads


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


class EpochRowSender(pl.Callback):
    """Sends the epoch history to a sink (anything with ``log_rows(rows)``; a run sends it
    to its MLflow run) in batches of ``every`` epochs, or sooner once ``every_s`` seconds
    have passed since the last send: a kill -9 loses at most that much of the record."""

    def __init__(
        self,
        sink: Any,
        history: EpochHistory,
        every: int = 25,
        logged_through: int = -1,
        *,
        every_s: float = 30.0,
    ) -> None:
        self.sink, self.history, self.every, self.every_s = sink, history, every, every_s
        # Epochs up to this one are in MLflow already (a resumed run): never sent twice.
        self.logged_through = logged_through
        self.last_sent = time.monotonic()

    def _unsent(self) -> list[dict[str, float]]:
        return [row for row in self.history.rows if row["epoch"] > self.logged_through]

    def flush(self) -> None:
        rows = self._unsent()
        if rows:
            self.sink.log_rows(rows)
            self.logged_through = int(rows[-1]["epoch"])
        self.last_sent = time.monotonic()

    # Every rank has the same global metrics; only rank 0 sends them (once).
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero or not (unsent := len(self._unsent())):
            return
        if unsent >= self.every or time.monotonic() - self.last_sent >= self.every_s:
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
        # The last trained epoch's weights, kept when the best are restored: what early
        # stopping bought is scored against them (training.fit).
        self.last_state: dict[str, torch.Tensor] | None = None

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
            self.last_state = copy.deepcopy(pl_module.state_dict())
            pl_module.load_state_dict(self.best_state)

    def state_dict(self) -> dict[str, Any]:
        state = {"score": self.best_score, "epoch": self.best_epoch, "weights": self.best_state}
        return state | ({"last": self.last_state} if self.last_state is not None else {})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state_dict["score"], state_dict["epoch"]
        self.best_state = state_dict["weights"]
        self.last_state = state_dict.get("last")


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


class ShareIdleCores(pl.Callback):
    """At each epoch's start, takes the cores a sweep's finished jobs left idle: once fewer
    jobs remain than run side by side, the running ones share every core
    (threads.shared_threads). ``done_file`` grows a byte per finished job (core.progress).
    Only the thread count changes: a matmul's sums may then round differently in the
    last bits (docs/benchmarks.md)."""

    def __init__(self, done_file: Path, total: int, at_once: int, cores: int) -> None:
        self.done_file, self.total, self.at_once, self.cores = done_file, total, at_once, cores

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = self.done_file.stat().st_size if self.done_file.exists() else 0
        current = torch.get_num_threads()
        wanted = shared_threads(self.cores, self.at_once, self.total - done, current)
        if wanted != current:
            torch.set_num_threads(wanted)


class ReportEpochs(pl.Callback):
    """Reports ``monitor`` after every validation to ``report(epoch, value)`` and stops the
    fit at the end of the epoch when it answers True (a search's pruner, fitscope.search)."""

    def __init__(self, report: Callable[[int, float], bool], monitor: str) -> None:
        self.report, self.monitor = report, monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: FitModule) -> None:
        row = pl_module.epoch_metrics
        value = row.get(self.monitor) if row else None
        if trainer.sanity_checking or value is None or not math.isfinite(value):
            return
        if self.report(int(row["epoch"]), float(value)):
            trainer.should_stop = True


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
