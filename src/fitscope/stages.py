"""The DVC stages that train: their Hydra overrides come from params.yaml, never a shell.

DVC runs a stage's ``cmd`` through a shell, so a value interpolated into it from
params.yaml (``$(...)``, backticks) would be executed. The train and search stages
therefore pass only their stage key; the overrides are read and split here.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from fitscope.config import check_name
from fitscope.errors import FitscopeError
from fitscope.threads import AUTO, usable_cpus


def _section(params: dict[str, Any], *keys: str) -> Any:
    value: Any = params
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(keys[: depth + 1])
            raise FitscopeError(f"params.yaml has no {where}. Fix: add it (see the README)")
        value = value[key]
    return value


def stage_target(name: str | None) -> str:
    """``name``, or the key of the DVC stage running us (``DVC_STAGE=train@<dataset>``)."""
    if name:
        return name
    stage = os.environ.get("DVC_STAGE", "")
    if not stage.startswith("train@"):
        raise FitscopeError(
            "no dataset or variant given and not run as a DVC train stage. Fix: `fitscope "
            "train <name>` with a dataset under params.yaml's variants, or one variant's key"
        )
    return stage.removeprefix("train@")


def variant_specs(params: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every variant of params.yaml (``variants.<dataset>.<name>``), with its ``dataset``."""
    groups = _section(params, "variants")
    if not isinstance(groups, dict):
        raise FitscopeError("params.yaml's variants is not a mapping. Fix: see the README")
    specs: dict[str, dict[str, Any]] = {}
    for dataset, variants in groups.items():
        if not isinstance(variants, dict):
            raise FitscopeError(
                f"params.yaml's variants.{dataset} is not a mapping of variants. "
                "Fix: `variants: {<dataset>: {<name>: {study: ..., overrides: ...}}}`"
            )
        for name, spec in variants.items():
            if not isinstance(spec, dict):
                raise FitscopeError(
                    f"variants.{dataset}.{name} is not a mapping. Fix: give it study and overrides"
                )
            if name in groups:  # `fitscope train <name>` would mean the dataset
                raise FitscopeError(
                    f"variant variants.{dataset}.{name} is named like a dataset. "
                    "Fix: give it another name"
                )
            if name in specs:  # runs, metrics and MLflow runs are named by the variant alone
                raise FitscopeError(
                    f"variant {name!r} is under both variants.{specs[name]['dataset']} and "
                    f"variants.{dataset}. Fix: give one of them another name"
                )
            specs[name] = {**spec, "dataset": dataset}
    return specs


def jobs_at_once(value: Any, jobs: int) -> int:
    """``study.jobs``: how many of a stage's ``jobs`` train side by side (``auto``: a core
    each, so every run gets ``cores // n`` threads)."""
    if value == AUTO:
        return max(1, min(jobs, usable_cpus()))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FitscopeError(f"study.jobs={value!r} is not auto or a count. Fix: auto, 1 or 2")
    return min(value, jobs)


def _variant_job(params: dict[str, Any], name: str, spec: dict[str, Any]) -> list[str]:
    """The overrides that make one job variant ``name`` (``variants.<dataset>.<name>``),
    each parsed as Hydra will parse it: a bad one is named with its params.yaml key."""
    from hydra.errors import OverrideParseException

    from fitscope.sweeps import parse_overrides, usage_error

    check_name("variant", name)
    where = f"variants.{spec['dataset']}.{name}"
    try:
        overrides = shlex.split(
            str(_section(params, "variants", spec["dataset"], name, "overrides"))
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
        f"study={_section(params, 'variants', spec['dataset'], name, 'study')}",
        f"variant={name}",
    ]
    try:
        parse_overrides(job)
    except OverrideParseException as exc:
        raise FitscopeError(f"{where}.overrides: {usage_error(exc)}") from None
    return job


def _count_values(override: str) -> int:
    """How many values a sweep override takes (``seed=0,1`` or ``seed=range(3)``: 2 or 3)."""
    from fitscope.sweeps import parse_overrides

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
    groups = _section(params, "variants")
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
    profile = _section(params, "study", "profile")
    seeds = str(_section(params, "study", "seeds"))
    at_once = jobs_at_once(
        _section(params, "study").get("jobs", AUTO), len(jobs) * _count_values(f"seed={seeds}")
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
        f"hydra.sweeper.n_trials={_section(params, 'search', 'trials')}",
        f"trainer.max_epochs={_section(params, 'search', 'epochs')}",
        f"hydra.sweep.dir=search/runs/{sampler}",
        "force=true",
    ]


def run_train(overrides: list[str], jobs: list[list[str]] | None = None) -> None:
    """``fitscope-train -m OVERRIDES`` in this process (one Python start per stage).

    ``jobs``: one override list per job, launched by the job-list sweeper
    (``hydra_plugins.fitscope_sweeper``); Hydra records them in the sweep's multirun.yaml.
    """
    from fitscope.train import main

    if jobs:
        from hydra.core.config_store import ConfigStore

        from hydra_plugins.fitscope_sweeper import JobListSweeperConf

        node = JobListSweeperConf(jobs=jobs)
        ConfigStore.instance().store(group="hydra/sweeper", name="dvc_stage", node=node)
        overrides = ["hydra/sweeper=dvc_stage", *overrides]
    sys.argv = ["fitscope-train", "-m", *overrides]
    main()
