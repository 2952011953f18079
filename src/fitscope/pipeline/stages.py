"""The DVC stages that train: their Hydra overrides come from params.yaml, never a shell.

DVC runs a stage's ``cmd`` through a shell, so a value interpolated into it from
params.yaml (``$(...)``, backticks) would be executed. The train and search stages
therefore pass only their stage key; the overrides are read and split here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
from typing import Any

from fitscope.core.checks import check_name
from fitscope.core.errors import FitscopeError
from fitscope.pipeline.diagnostics import RUNS_DIR, diagnose_jobs
from fitscope.pipeline.sweeps import parse_overrides, usage_error
from fitscope.pipeline.variants import jobs_at_once, params_section, variant_specs
from fitscope.training.threads import AUTO

log = logging.getLogger(__name__)


def _variant_job(
    params: dict[str, Any],
    name: str,
    spec: dict[str, Any],
    study: str | None = None,
    run_name: str | None = None,
) -> list[str]:
    """The overrides that make one job variant ``name`` (``variants.<dataset>.<name>``),
    each parsed as Hydra will parse it: a bad one is named with its params.yaml key.
    ``study``, ``run_name``: another study and variant name for the job (a diagnostic's)."""
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
        f"study={study or params_section(params, 'variants', spec['dataset'], name, 'study')}",
        f"variant={run_name or name}",
    ]
    try:
        parse_overrides(job)
    except OverrideParseException as exc:
        raise FitscopeError(f"{where}.overrides: {usage_error(exc)}") from None
    return job


def _values(seeds: str) -> list[str]:
    """The seeds ``study.seeds`` names (``0,1`` or ``range(3)``), as Hydra expands them."""
    (parsed,) = parse_overrides([f"seed={seeds}"])
    if parsed.is_sweep_override():
        return list(parsed.sweep_string_iterator())
    return [str(parsed.value())]


def _sweep(params: dict[str, Any], stage: str, jobs: list[list[str]], sweep_dir: str) -> list[str]:
    """The overrides of a stage's sweep: profile, seeds, identity, directory, launcher."""
    profile = params_section(params, "study", "profile")
    seeds = str(params_section(params, "study", "seeds"))
    at_once = jobs_at_once(
        params_section(params, "study").get("jobs", AUTO),
        len(jobs) * len(_values(seeds)),
    )
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={at_once}"] if at_once > 1 else []
    return [
        f"+profile={profile}",
        f"seed={seeds}",
        *_identity(profile, stage_inputs(stage)),
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.sweep.subdir=${variant}/${seed}",
        *launcher,
    ]


def diagnose_sweep(
    params: dict[str, Any], dataset: str | None = None
) -> tuple[list[str], list[list[str]]]:
    """The Hydra overrides and jobs of DVC stage ``diagnose`` (fitscope.pipeline.diagnostics):
    one sweep, like a train stage's, of every dataset's diagnostics (or ``dataset``'s)."""
    specs = variant_specs(params)

    def variant_job(variant: str, study: str, run_name: str) -> list[str]:
        return _variant_job(params, variant, specs[variant], study, run_name)

    jobs = diagnose_jobs(params, dataset, variant_job)
    return (_sweep(params, "diagnose", jobs, str(RUNS_DIR)) if jobs else []), jobs


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
    return _sweep(params, f"train@{dataset}", jobs, f"runs/{dataset}"), jobs


def _identity(profile: str, inputs: str | None) -> list[str]:
    """What ties a stage's runs to its inputs: with their digest, a re-run with the same
    inputs skips the configs that finished and resumes the interrupted ones, and new
    inputs train everything anew under a parent of their own. Without it (no DVC
    repository), every job is forced to train, as DVC would re-run the stage."""
    if inputs is None:
        return [f"tracking.parent_key=dvc-{profile}", "force=true"]
    return [f"tracking.parent_key=dvc-{profile}-{inputs}", f"stage_inputs={inputs}"]


def stage_inputs(stage: str) -> str | None:
    """A digest of what DVC stage ``stage`` depends on, as DVC hashes it (each dep's md5,
    the values of its params): equal digests mean DVC sees the same stage. None when
    there is no DVC repository or no such stage."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo() as repo:
            (found,) = repo.stage.collect(f"{repo.root_dir}/dvc.yaml:{stage}")
            deps = []
            for dep in found.deps:
                dep.save()
                deps.append((str(dep.def_path), dep.hash_info.value))
    except (DvcException, ValueError, OSError) as exc:
        log.info("no DVC stage %s (%s): its jobs train afresh", stage, exc)
        return None
    text = json.dumps(sorted(deps, key=lambda d: d[0]), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def search_overrides(params: dict[str, Any], sampler: str) -> list[str]:
    """The Hydra overrides of DVC stage ``search@<sampler>`` (search/dvc.yaml)."""
    return [
        f"hparams_search=mnist_{sampler}",
        f"hydra.sweeper.n_trials={params_section(params, 'search', 'trials')}",
        f"trainer.max_epochs={params_section(params, 'search', 'epochs')}",
        f"hydra.sweep.dir=search/runs/{sampler}",
        # The study lives in the stage's output, which DVC deletes before a re-run: a
        # re-run (the code or the budget changed) is a new study.
        f"hydra.sweeper.storage=search/runs/{sampler}/optuna.journal",
        "force=true",
    ]
