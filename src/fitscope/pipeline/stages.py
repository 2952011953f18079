"""The DVC stages that train: their Hydra overrides come from params.yaml, never a shell.

DVC runs a stage's ``cmd`` through a shell, so a value interpolated into it from
params.yaml (``$(...)``, backticks) would be executed. The train and search stages
therefore pass only their stage key; the overrides are read and split here.
"""

from __future__ import annotations

import shlex
from typing import Any

from fitscope.core.checks import check_name
from fitscope.core.errors import FitscopeError
from fitscope.pipeline.sweeps import parse_overrides, usage_error
from fitscope.pipeline.variants import jobs_at_once, params_section, variant_specs
from fitscope.training.threads import AUTO


def _variant_job(params: dict[str, Any], name: str, spec: dict[str, Any]) -> list[str]:
    """The overrides that make one job variant ``name`` (``variants.<dataset>.<name>``),
    each parsed as Hydra will parse it: a bad one is named with its params.yaml key."""
    from hydra.errors import OverrideParseException

    check_name("variant", name)
    where = f"variants.{spec['dataset']}.{name}"
    try:
        overrides = shlex.split(
            str(params_section(params, "variants", spec["dataset"], name, "overrides"))
        )
    except ValueError as exc:
        raise FitscopeError(
            f"{where}.overrides cannot be split ({exc}). Fix: balance its quotes"
        ) from None
    if any("${" in o for o in overrides):
        # The job list is part of the sweep's config, where OmegaConf would resolve it
        # against the sweep's values instead of each job's.
        raise FitscopeError(
            f"{where}.overrides holds a `${{...}}` interpolation, which a DVC stage cannot "
            "pass on. Fix: write the value itself, or put the interpolation in a conf/ preset"
        )
    job = [
        *overrides,
        f"study={params_section(params, 'variants', spec['dataset'], name, 'study')}",
        f"variant={name}",
    ]
    try:
        parse_overrides(job)
    except OverrideParseException as exc:
        raise FitscopeError(f"{where}.overrides: {usage_error(exc)}") from None
    return job


def _count_values(override: str) -> int:
    """How many values a sweep override takes (``seed=0,1`` or ``seed=range(3)``: 2 or 3)."""

    (parsed,) = parse_overrides([override])
    return len(list(parsed.sweep_string_iterator())) if parsed.is_sweep_override() else 1


def train_sweep(params: dict[str, Any], name: str) -> tuple[list[str], list[list[str]]]:
    """The Hydra overrides and jobs of DVC stage ``train@<dataset>`` (or of one variant).

    A dataset's variants train as one sweep in one process (Python, torch, Lightning and
    MLflow start once, docs/pipeline.md), ``study.jobs`` of them at a time; each seed of
    ``study.seeds`` is a job of its own. A variant's ``overrides`` are split into words as
    a shell would (quotes work) but never run through one: ``$(...)`` stays literal text,
    which the schema refuses.
    """
    specs = variant_specs(params)
    groups = params_section(params, "variants")
    if name in groups:
        dataset, chosen = name, list(groups[name])
    elif name in specs:
        dataset, chosen = specs[name]["dataset"], [name]
    else:
        raise FitscopeError(
            f"params.yaml has no variants.{name} and no variant {name!r}. "
            f"Fix: one of {', '.join([*groups, *specs])}"
        )
    check_name("dataset", dataset)
    if not chosen:  # a sweep without jobs would train the default config instead
        raise FitscopeError(f"params.yaml's variants.{dataset} is empty. Fix: add a variant")
    jobs = [_variant_job(params, variant, specs[variant]) for variant in chosen]
    profile = params_section(params, "study", "profile")
    seeds = str(params_section(params, "study", "seeds"))
    at_once = jobs_at_once(
        params_section(params, "study").get("jobs", AUTO),
        len(jobs) * _count_values(f"seed={seeds}"),
    )
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={at_once}"] if at_once > 1 else []
    overrides = [
        f"+profile={profile}",
        f"seed={seeds}",
        f"tracking.parent_key=dvc-{profile}",
        "force=true",
        f"hydra.sweep.dir=runs/{dataset}",
        "hydra.sweep.subdir=${variant}/${seed}",
        *launcher,
    ]
    return overrides, jobs


def search_overrides(params: dict[str, Any], sampler: str) -> list[str]:
    """The Hydra overrides of DVC stage ``search@<sampler>`` (search/dvc.yaml)."""
    return [
        f"hparams_search=mnist_{sampler}",
        f"hydra.sweeper.n_trials={params_section(params, 'search', 'trials')}",
        f"trainer.max_epochs={params_section(params, 'search', 'epochs')}",
        f"hydra.sweep.dir=search/runs/{sampler}",
        "force=true",
    ]
