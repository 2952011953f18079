"""Hydra's side of a run: its usage errors as one line, and every sweep job checked first."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fitscope.core.errors import FitscopeError

HINT = "`python -m fitscope.train --help` lists the groups, `--cfg job` every key"


def usage_error(exc: HydraException | OmegaConfBaseException) -> str:
    """One line for a Hydra/OmegaConf usage error (Hydra prints several)."""
    if isinstance(exc, OverrideParseException):
        message = exc.message.splitlines()[0] if exc.message else "syntax error"
        return f"cannot parse override {exc.override!r}: {message}. Fix: correct its syntax"
    if isinstance(exc, MissingConfigException) and exc.options:
        first = str(exc).splitlines()[0]
        return f"{first}. Fix: use one of {', '.join(exc.options)}"
    lines = [str(exc).splitlines()[0].rstrip(".")] if str(exc) else [type(exc).__name__]
    if exc.__cause__ is not None and str(exc.__cause__):
        lines.append(str(exc.__cause__).splitlines()[0].rstrip("."))
    return f"{': '.join(lines)}. Fix: correct the override ({HINT})"


def callback_errors_exit(hook: Callable[..., None]) -> Callable[..., None]:
    """Make a Hydra callback hook's failure end the process.

    Hydra turns an ``Exception`` raised in a callback into a warning and carries on
    (a sweep would run without its checks or its parent run); ``SystemExit`` passes.
    """

    @functools.wraps(hook)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            hook(*args, **kwargs)
        except FitscopeError as exc:
            print(f"fitscope: error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except Exception:
            traceback.print_exc()
            raise SystemExit(1) from None

    return wrapper


def parse_overrides(overrides: list[str]) -> list[Override]:
    """Hydra's own parse of command-line overrides (raises OverrideParseException)."""
    return OverridesParser.create().parse_overrides(overrides)


def _edge_values(override: Override) -> list[str]:
    """Values worth checking for a search dimension: each choice, or the range's ends."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return [str(v) for v in override.sweep_string_iterator()]
    if isinstance(value, RangeSweep):
        values = [str(v) for v in override.sweep_string_iterator()]
        return values[:1] + values[-1:]
    if isinstance(value, IntervalSweep):
        return [str(value.start), str(value.end)]
    return [override.get_value_element_as_str()]


def is_search(config: DictConfig) -> bool:
    """True for hyperparameter searches (Optuna sweeper), where trials are drawn later."""
    return "optuna" in str(config.hydra.sweeper.get("_target_", "")).lower()


def job_overrides(config: DictConfig) -> list[list[str]]:
    """The override list of every job a multirun will launch (or, for a search, its edges).

    The basic sweeper's jobs are the product of the sweep overrides on the command line
    and in ``hydra.sweeper.params``, as Hydra's BasicSweeper builds them; the job-list
    sweeper crosses its ``jobs`` with that product. A search
    (Optuna) draws its jobs later, so each search dimension is checked at its edges.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from hydra_plugins.fitscope_sweeper import cross_jobs

    arguments = [str(o) for o in config.hydra.overrides.task]
    params = config.hydra.sweeper.get("params")
    params = OmegaConf.to_container(params, resolve=False) if params else {}
    in_config = [f"{k}={v}" for k, v in params.items()]
    if not is_search(config):
        grid = BasicSweeper.split_arguments(parse_overrides(in_config + arguments), None)[0]
        listed = config.hydra.sweeper.get("jobs") or []  # the job-list sweeper (DVC stages)
        return cross_jobs([[str(o) for o in job] for job in listed], grid)
    fixed = [o.input_line for o in parse_overrides(arguments) if not o.is_sweep_override()]
    jobs = [fixed]
    for override in parse_overrides(in_config):
        key = override.get_key_element()
        jobs += [[*fixed, f"{key}={value}"] for value in _edge_values(override)]
    return jobs


def _validate_job(
    job: DictConfig, num: int | None, output_dir: str | None, validate: Callable[[DictConfig], None]
) -> None:
    """``validate`` one composed job as its task will see it (``hydra:`` values included);
    a sweep job's output directory is its ``hydra.sweep.dir``/``subdir``, as Hydra makes it."""
    with open_dict(job):
        if num is not None:
            job.hydra.job.num = num
        if output_dir is None:
            output_dir = str(Path(job.hydra.sweep.dir) / str(job.hydra.sweep.subdir))
        job.hydra.runtime.output_dir = output_dir
    HydraConfig.instance().set_config(job)
    with open_dict(job):
        del job["hydra"]
    validate(job)


def validate_run(config: DictConfig, validate: Callable[[DictConfig], None]) -> None:
    """Validate a single run's config in ``on_run_start``, before Hydra creates its directory."""
    try:
        _validate_job(config.copy(), None, str(config.hydra.run.dir), validate)
    finally:
        HydraConfig.instance().set_config(config)


def validate_jobs(config: DictConfig, validate: Callable[[DictConfig], None]) -> int:
    """Compose and ``validate`` every job of the multirun ``config``; return the job count.

    Runs in ``on_multirun_start``, before the parent run or any directory exists.
    """
    loader = GlobalHydra.instance().config_loader()
    jobs = job_overrides(config)
    try:
        for num, overrides in enumerate(jobs):
            try:
                job = loader.load_sweep_config(config, overrides)
            except (HydraException, OmegaConfBaseException) as exc:
                raise FitscopeError(f"sweep job {overrides}: {usage_error(exc)}") from None
            try:
                _validate_job(job, num, None, validate)
            except FitscopeError as exc:
                raise FitscopeError(f"sweep job {' '.join(overrides)}: {exc}") from None
    finally:
        HydraConfig.instance().set_config(config)
    return len(jobs)
