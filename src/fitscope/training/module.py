"""The LightningModule: the MLP's training and validation steps, the L2 penalty, and the
metrics summarised once per epoch.
"""

from __future__ import annotations

import math
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from fitscope.core.errors import FitscopeError
from fitscope.model.metrics import classification_metrics, data_loss
from fitscope.model.mlp import l2_penalty


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
        optimizer = build_optimizer(list(self.parameters()), self.optimizer_cfg)
        if self.scheduler_cfg["name"] == "none":
            return optimizer
        decay_steps = self.scheduler_cfg["decay_epochs"] * self.steps_per_epoch
        # Keras InverseTimeDecay: lr0 / (1 + step / decay_steps), updated every step.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 1.0 / (1.0 + step / decay_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def build_optimizer(parameters: list[nn.Parameter], opt: dict[str, Any]) -> torch.optim.Optimizer:
    """The optimizer a run trains with (``optimizer`` config: adam or sgd).

    Fused: one kernel updates every parameter instead of a Python loop of small ops (Adam's
    step on the 512x4 model took 1.34 ms here, fused 0.55 ms; issue 22). The same update;
    only the order of float operations differs. Parameters off CPU and CUDA (meta, MPS)
    get the unfused one. Lightning refuses gradient clipping with a fused optimizer under
    16-mixed: no run clips today. A checkpoint of an unfused optimizer resumes unfused.
    """
    fused = all(p.device.type in ("cpu", "cuda") for p in parameters)
    if opt["name"] == "adam":
        return torch.optim.Adam(
            parameters,
            lr=opt["lr"],
            betas=tuple(opt.get("betas", (0.9, 0.999))),
            eps=opt.get("eps", 1e-7),
            fused=fused,
        )
    return torch.optim.SGD(parameters, lr=opt["lr"], momentum=opt.get("momentum", 0.0), fused=fused)
