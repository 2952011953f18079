"""fitscope's Hydra sweepers: a list of jobs (the variants of one DVC train stage), and a
hyperparameter search over Optuna's ask-and-tell interface (``hydra/sweeper=optuna``).

Hydra's basic sweeper launches the product of swept values. A stage's variants differ
in several overrides at once (``+experiment=higgs_capacity model=tiny``, then
``... regularization=l2``), so this sweeper takes each variant's overrides as one job and
crosses them with the command line's own sweeps (the seeds). Whatever launcher is chosen
(basic, joblib, Ray, submitit) runs the jobs. Hydra loads sweepers from ``hydra_plugins``.

No ``from __future__ import annotations`` here: Hydra's plugin scan runs this module
outside ``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from omegaconf import MISSING, DictConfig


@dataclass
class JobListSweeperConf:
    _target_: str = "hydra_plugins.fitscope_sweeper.JobListSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045  # OmegaConf reads these hints
    params: Optional[dict[str, str]] = None  # noqa: UP045
    # One list of overrides per variant; each runs once per combination of the sweep.
    jobs: list[list[str]] = field(default_factory=list)


ConfigStore.instance().store(
    group="hydra/sweeper", name="job_list", node=JobListSweeperConf, provider="fitscope"
)


def cross_jobs(jobs: list[list[str]], grid: list[list[str]]) -> list[list[str]]:
    """Every job of ``jobs`` with every combination of ``grid``, job by job (variant-major)."""
    if not jobs:
        return grid
    return [[*job, *combination] for job in jobs for combination in grid]


class JobListSweeper(BasicSweeper):
    """The basic sweeper, whose jobs are ``jobs`` crossed with the swept values, longest
    expected first."""

    def __init__(
        self,
        max_batch_size: int | None = None,
        params: dict[str, str] | None = None,
        jobs: Any = (),
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.jobs = [[str(o) for o in job] for job in jobs]

    def _compose(self, job: list[str]) -> Any:
        """A job's config, as Hydra composes it for the job."""
        return self.hydra_context.config_loader.load_sweep_config(self.config, job)

    def split_arguments(  # type: ignore[override]  # an instance method: it needs the jobs
        self, overrides: list[Override], max_batch_size: int | None
    ) -> list[list[list[str]]]:
        grid = BasicSweeper.split_arguments(overrides, None)[0]
        everything = cross_jobs(self.jobs, grid)
        if self.jobs:  # a DVC train stage: its longest jobs start first (fitscope.pipeline)
            from fitscope.pipeline.schedule import longest_first

            everything = longest_first(everything, self._compose)
        size = max_batch_size or len(everything) or 1
        return [everything[i : i + size] for i in range(0, len(everything), size)]


# The search: samplers and pruners are Hydra config groups of Optuna's own classes.
@dataclass
class TPESamplerConf:
    _target_: str = "optuna.samplers.TPESampler"
    seed: Optional[int] = None  # noqa: UP045
    n_startup_trials: int = 10  # random trials before TPE models the results
    multivariate: bool = True  # one model of all dimensions together
    constant_liar: bool = True  # parallel trials: running ones count as bad results


@dataclass
class RandomSamplerConf:
    _target_: str = "optuna.samplers.RandomSampler"
    seed: Optional[int] = None  # noqa: UP045


@dataclass
class NopPrunerConf:
    _target_: str = "optuna.pruners.NopPruner"


@dataclass
class MedianPrunerConf:
    _target_: str = "optuna.pruners.MedianPruner"
    n_startup_trials: int = 5  # trials that finish before any is pruned
    n_warmup_steps: int = 5  # epochs of every trial before it can be pruned
    interval_steps: int = 1


@dataclass
class HyperbandPrunerConf:
    _target_: str = "optuna.pruners.HyperbandPruner"
    min_resource: int = 5  # epochs every trial gets
    max_resource: Any = "auto"  # the most epochs a trial reported so far
    reduction_factor: int = 3


@dataclass
class ThresholdPrunerConf:
    _target_: str = "optuna.pruners.ThresholdPruner"
    lower: Optional[float] = None  # noqa: UP045  # prune a trial whose objective is below...
    upper: Optional[float] = None  # noqa: UP045  # ... or above this (diverging)
    n_warmup_steps: int = 0


@dataclass
class OptunaSearchConf:
    _target_: str = "hydra_plugins.fitscope_sweeper.OptunaSearchSweeper"
    _recursive_: bool = False  # the sampler and pruner are built by the search, with its seed
    defaults: list[Any] = field(
        default_factory=lambda: [{"sampler": "tpe"}, {"pruner": "none"}, "_self_"]
    )
    sampler: Any = MISSING
    pruner: Any = MISSING
    direction: str = "minimize"
    study_name: Optional[str] = None  # noqa: UP045
    # auto: the team stack's PostgreSQL when it is up, else <sweep dir>/../optuna.journal;
    # a file path (journal), a database URL, or null (in memory: no resume, no pruning).
    storage: Optional[str] = "auto"  # noqa: UP045
    n_trials: int = 20  # the study's budget: trials that finished, run or wait, all processes
    n_jobs: int = 1  # trials per batch (launched together)
    max_failure_rate: float = 1.0
    params: Optional[dict[str, str]] = None  # noqa: UP045


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="optuna", node=OptunaSearchConf, provider="fitscope")
for _name, _node in (("tpe", TPESamplerConf), ("random", RandomSamplerConf)):
    _store.store(group="hydra/sweeper/sampler", name=_name, node=_node, provider="fitscope")
for _name, _node in (
    ("none", NopPrunerConf),
    ("median", MedianPrunerConf),
    ("hyperband", HyperbandPrunerConf),
    ("threshold", ThresholdPrunerConf),
):
    _store.store(group="hydra/sweeper/pruner", name=_name, node=_node, provider="fitscope")


class OptunaSearchSweeper(Sweeper):
    """Optuna's ask-and-tell over any Hydra launcher (fitscope.pipeline.search)."""

    def __init__(self, **sweeper: Any) -> None:  # read from the config in sweep()
        pass

    def setup(self, *, hydra_context: Any, task_function: Any, config: DictConfig) -> None:
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        from fitscope.pipeline.search import run_search

        run_search(self.config.hydra.sweeper, self.config, self.launcher, arguments)
