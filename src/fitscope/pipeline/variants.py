"""params.yaml's ``variants`` and ``study`` sections: which variants a DVC train stage
trains, and how many at once.
"""

from __future__ import annotations

import os
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.training.threads import AUTO, usable_cpus


def params_section(params: dict[str, Any], *keys: str) -> Any:
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
    groups = params_section(params, "variants")
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
