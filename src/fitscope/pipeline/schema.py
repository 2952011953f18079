"""The one schema of the training config: Hydra structured configs in the ConfigStore.

``conf/train.yaml`` starts its defaults list with ``train_schema`` (the root below)
and each optimizer file with its own schema, so Hydra refuses unknown keys (also
with ``+``) and wrong types while composing. Ranges, finiteness and the rules
between keys are checked when :func:`check` turns the composed config into these
dataclasses (``__post_init__``), before any run, directory or MLflow store exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from functools import partial
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fitscope.core.checks import check_choice, check_name, check_number
from fitscope.core.errors import FitscopeError
from fitscope.pipeline.cluster import job_env

OBJECTIVES = ("val/loss", "val/acc", "val/auroc")


def ranged(**bounds: Any) -> Any:
    """A field whose value must be a finite number within ``bounds`` (see check_number)."""
    return field(default=MISSING, metadata={"rule": partial(check_number, **bounds)})


def one_of(*options: str) -> Any:
    return field(default=MISSING, metadata={"rule": partial(check_choice, choices=options)})


def safe_name(default: Any = MISSING, **kwargs: Any) -> Any:
    """A field used in paths and MLflow names (see check_name)."""
    return field(default=default, metadata={"rule": partial(check_name, **kwargs)})


@dataclass
class Section:
    """Runs every field's rule, then :meth:`check_rules` for rules between fields."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            rule: Callable[..., None] | None = f.metadata.get("rule")
            if rule is not None:
                where = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
                rule(where, getattr(self, f.name))
        self.check_rules()

    def check_rules(self) -> None:
        """Rules that involve several fields (none by default)."""


@dataclass
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"
    name: str = one_of("higgs", "mnist")
    dir: str = MISSING
    task: str = one_of("binary", "multiclass")
    num_classes: int = ranged(low=2, integer=True)
    batch_size: int = ranged(low=1, integer=True)
    train_size: int | None = ranged(low=1, integer=True, allow_none=True)
    # null: the training split in memory; N: memory-mapped, read in shuffled chunks of N rows.
    chunk_rows: int | None = field(
        default=None,
        metadata={"rule": partial(check_number, low=1, integer=True, allow_none=True)},
    )

    def check_rules(self) -> None:
        if self.chunk_rows is not None and self.chunk_rows < self.batch_size:
            raise FitscopeError(
                f"data.chunk_rows={self.chunk_rows} is smaller than data.batch_size="
                f"{self.batch_size}. Fix: raise data.chunk_rows (e.g. 100000)"
            )
        if (self.task == "binary") != (self.num_classes == 2):
            raise FitscopeError(
                f"data.task={self.task} with data.num_classes={self.num_classes}. Fix: binary "
                "tasks have 2 classes, multiclass tasks more"
            )


@dataclass
class ModelConfig(Section):
    SECTION: ClassVar[str] = "model"
    name: str = safe_name()
    width: int = ranged(low=1, high=65536, integer=True)
    depth: int = ranged(low=0, high=64, integer=True)
    activation: str = one_of("elu", "relu", "tanh", "gelu")
    init: str = one_of("glorot_uniform", "he_normal", "torch_default")


@dataclass
class RegularizationConfig(Section):
    SECTION: ClassVar[str] = "regularization"
    name: str = safe_name()
    l2: float = ranged(low=0.0)
    l2_include_output: bool = False
    dropout: float = ranged(low=0.0, high=1.0, high_open=True)
    batchnorm: bool = False
    augment_shift: int = ranged(low=0, high=8, integer=True)


@dataclass
class AdamConfig(Section):
    SECTION: ClassVar[str] = "optimizer"
    name: str = one_of("adam")
    lr: float = ranged(low=0.0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = ranged(low=0.0, high=1.0)

    def check_rules(self) -> None:
        check_lr(self.lr)
        if len(self.betas) != 2:
            raise FitscopeError(
                f"optimizer.betas={self.betas} needs 2 values. Fix: e.g. [0.9,0.999]"
            )
        for k, beta in enumerate(self.betas):
            check_number(f"optimizer.betas[{k}]", beta, low=0.0, high=1.0, high_open=True)


@dataclass
class SgdConfig(Section):
    SECTION: ClassVar[str] = "optimizer"
    name: str = one_of("sgd")
    lr: float = ranged(low=0.0)
    momentum: float = ranged(low=0.0, high=1.0, high_open=True)

    def check_rules(self) -> None:
        check_lr(self.lr)


def check_lr(lr: float) -> None:
    if not lr > 0:
        raise FitscopeError("optimizer.lr must be > 0. Fix: set a positive learning rate")


@dataclass
class SchedulerConfig(Section):
    SECTION: ClassVar[str] = "scheduler"
    name: str = one_of("inverse_time", "none")
    decay_epochs: float = ranged(low=0.0)

    def check_rules(self) -> None:
        if self.name == "inverse_time" and not self.decay_epochs >= 1:
            raise FitscopeError(
                f"scheduler.decay_epochs={self.decay_epochs} must be >= 1 for inverse_time. "
                "Fix: raise it, or use scheduler=none"
            )


@dataclass
class EarlyStoppingConfig(Section):
    SECTION: ClassVar[str] = "callbacks.early_stopping"
    enabled: bool = True
    monitor: str = one_of(*OBJECTIVES)
    mode: str = one_of("min", "max")
    patience: int = ranged(low=1, integer=True)
    min_delta: float = ranged(low=0.0)
    restore_best_weights: bool = True


@dataclass
class CheckpointConfig(Section):
    SECTION: ClassVar[str] = "callbacks.checkpoint"
    save_best: bool = True
    dir: str = MISSING
    every_s: float | None = ranged(low=0.0, allow_none=True)
    every_epochs: int | None = ranged(low=1, integer=True, allow_none=True)
    keep: bool = False


@dataclass
class CallbacksConfig(Section):
    SECTION: ClassVar[str] = "callbacks"
    early_stopping: EarlyStoppingConfig = MISSING
    checkpoint: CheckpointConfig = MISSING
    progress_bar: bool = False


def check_num_threads(where: str, value: Any) -> None:
    """``auto`` or a whole number of threads from 1 to 1024."""
    if value != "auto":
        try:
            check_number(where, value, low=1, high=1024, integer=True)
        except FitscopeError:
            raise FitscopeError(
                f"{where}={value!r} is not valid. Fix: use auto or a whole number from 1 to 1024"
            ) from None


@dataclass
class TrainerConfig(Section):
    SECTION: ClassVar[str] = "trainer"
    accelerator: str = one_of("cpu", "gpu", "auto")
    devices: int = ranged(low=1, integer=True)
    max_epochs: int = ranged(low=1, integer=True)
    deterministic: bool = True
    # auto: OMP_NUM_THREADS if set, else the usable cores per process (fitscope.threads)
    num_threads: Any = field(default=MISSING, metadata={"rule": check_num_threads})
    # auto: bf16-mixed where the hardware has native bf16, else 32-true (fitscope.precision)
    precision: str = one_of("auto", "32-true", "bf16-mixed", "16-mixed")
    # ddp_spawn: `devices` processes train while this one waits; plain `ddp` would re-run
    # the command line (a whole Hydra sweep) in every rank, so it is not offered.
    strategy: str = one_of("auto", "ddp_spawn")

    def check_rules(self) -> None:
        if self.devices > 1 and self.strategy != "ddp_spawn":
            raise FitscopeError(
                f"trainer.devices={self.devices} needs trainer.strategy=ddp_spawn. Fix: use "
                "trainer=ddp_cpu (CPU) or add trainer.strategy=ddp_spawn"
            )
        if self.precision == "16-mixed" and self.accelerator != "gpu":
            raise FitscopeError(
                "trainer.precision=16-mixed needs trainer=gpu. Fix: use 32-true or bf16-mixed "
                "on CPU"
            )


@dataclass
class LoggerConfig(Section):
    SECTION: ClassVar[str] = "logger"
    name: str = one_of("mlflow", "none")
    log_model: bool = True
    flush_every: int = ranged(low=1, integer=True)
    flush_every_s: float = ranged(low=0.0)
    # MLflow's system metrics (the run page's System metrics tab), sampled this often.
    system_metrics: bool = True
    system_metrics_every_s: float = ranged(low=0.1)
    registered_model: str | None = safe_name(default=None, allow_none=True)


@dataclass
class PathsConfig(Section):
    SECTION: ClassVar[str] = "paths"
    data_dir: str = MISSING
    run_dir: str = MISSING


@dataclass
class TrackingConfig(Section):
    SECTION: ClassVar[str] = "tracking"
    parent_key: str | None = safe_name(default=None, allow_none=True)


@dataclass
class TrialConfig(Section):
    """The Optuna trial a search's job is: set by the search's sweeper, never by hand."""

    SECTION: ClassVar[str] = "trial"
    number: int | None = None
    study: str | None = None
    storage: str | None = None  # the study's storage (None: in memory, no per-epoch feed)


@dataclass
class TrainConfig(Section):
    """The root: what ``python -m fitscope.train`` composes."""

    seed: int = ranged(low=0, high=2**32 - 1, integer=True)
    profile: str = safe_name()
    study: str = safe_name()
    variant: str = safe_name()
    study_description: str = ""  # the MLflow experiment's description (presets say it)
    objective: str = one_of(*OBJECTIVES)
    force: bool = False
    # What a DVC train stage's inputs hash to (pipeline.stages.stage_inputs): part of the
    # config hash, so a re-run with the same inputs skips or resumes, and new inputs retrain.
    stage_inputs: str | None = safe_name(default=None, allow_none=True)
    # How a run shows its progress (fitscope.progress); neither changes what is trained.
    progress: bool = True
    progress_every_s: float = ranged(low=0.0)
    paths: PathsConfig = MISSING
    tracking: TrackingConfig = MISSING
    trial: TrialConfig = MISSING
    data: DataConfig = MISSING
    model: ModelConfig = MISSING
    regularization: RegularizationConfig = MISSING
    optimizer: Any = MISSING  # AdamConfig or SgdConfig, chosen by the optimizer group
    scheduler: SchedulerConfig = MISSING
    callbacks: CallbacksConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING

    def check_rules(self) -> None:
        if self.regularization.augment_shift and self.data.name != "mnist":
            raise FitscopeError(
                "regularization.augment_shift applies to MNIST images only. "
                "Fix: use data=mnist or regularization=none"
            )
        if "auroc" in (self.objective + self.callbacks.early_stopping.monitor) and (
            self.data.task != "binary"
        ):
            raise FitscopeError(
                "val/auroc (objective or early-stopping monitor) needs a binary task. "
                "Fix: use val/loss or val/acc"
            )


def register() -> None:
    """Put the schemas into Hydra's ConfigStore (idempotent)."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(group="optimizer", name="adam_schema", node=AdamConfig)
    store.store(group="optimizer", name="sgd_schema", node=SgdConfig)


register()
# `${fitscope.pid:}` in hydra.sweep.dir: two sweeps started in the same second get their own
# directories. Cached, so the jobs of one sweep (also in other processes) see the same value.
if not OmegaConf.has_resolver("fitscope.pid"):
    OmegaConf.register_new_resolver("fitscope.pid", os.getpid, use_cache=True)


def variant_name(data: str, model: str, regularization: str, base_model: str, base: str) -> str:
    """The one naming scheme of variants, the same from a DVC stage and a Hydra sweep.

    ``<data>-<model>`` without regularization (``base`` for the preset's own model),
    ``<data>-<regularization>`` on the preset's model, else ``<data>-<model>-<regularization>``.
    """
    if regularization == "none":
        return base if model == base_model and base else f"{data}-{model}"
    if model == base_model:
        return f"{data}-{regularization}"
    return f"{data}-{model}-{regularization}"


if not OmegaConf.has_resolver("fitscope.variant"):
    OmegaConf.register_new_resolver("fitscope.variant", variant_name)


# `${fitscope.job_env:}` in the Ray launcher preset: not cached, it is read at launch time.
if not OmegaConf.has_resolver("fitscope.job_env"):
    OmegaConf.register_new_resolver("fitscope.job_env", job_env)


def _refuse_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Keys added with ``+`` that the schema does not know (OmegaConf would keep them)."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in fields(schema)} if is_dataclass(schema) else None
    for key in node:
        if known is not None and key not in known and key != "hydra":
            raise FitscopeError(
                f"unknown config key {prefix}{key}. Fix: check its spelling; "
                f"{prefix.rstrip('.') or 'the root'} has {sorted(known)}"
            )
        child = node._get_node(key)  # the node itself: no interpolation is resolved here
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _refuse_unknown_keys(child, f"{prefix}{key}.")


def check(cfg: DictConfig) -> TrainConfig:
    """Validate a composed config against the schema; one-line FitscopeError if it fails."""
    _refuse_unknown_keys(cfg)
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        where = f" at {key}" if key else ""
        raise FitscopeError(f"invalid config{where}: {first}. Fix: correct the value") from None
