"""A Hydra sweeper that launches a list of jobs: the variants of one DVC train stage.

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
