"""params.yaml's ``diagnostics``: the runs behind the learning curve over training-set size
and the validation curves (DVC stage ``diagnose``, docs/diagnostics.md).

A diagnostic trains each of its ``variants`` again at every value of ``values`` for one
config key, its ``axis``. The variant's own value is the variant's run of the train
stage (left out of ``values``, it is not trained twice); ``origin``, when given, is the
variant that stands for the value 0 (the unregularized model of a strength curve).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitscope.core.checks import check_name
from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import atomic_path
from fitscope.pipeline.variants import params_section, variant_specs

# The runs of stage diagnose, runs/diagnostics/<run name>/<seed> (a DVC output of its own).
RUNS_DIR = Path("runs") / "diagnostics"
SIZE_AXIS = "data.train_size"  # the learning curve over training-set size; others: validation
KEYS = {"axis", "variants", "values", "origin"}


@dataclass(frozen=True)
class Diagnostic:
    """One diagnostic of params.yaml: ``diagnostics.<dataset>.<name>``."""

    dataset: str
    name: str
    axis: str
    variants: tuple[str, ...]
    values: tuple[float, ...]
    origin: str | None = None

    @property
    def study(self) -> str:
        """Its MLflow experiment (and the runs' ``study``): ``<dataset>_<name>``."""
        return f"{self.dataset}_{self.name}"

    @property
    def description(self) -> str:
        """Its MLflow experiment's description (no quote: it travels as a Hydra override)."""
        values = ", ".join(f"{v:g}" for v in self.values)
        return (
            f"{self.dataset.upper()} diagnostic {self.name}: {', '.join(self.variants)} trained "
            f"again at {self.axis} = {values} (params.yaml diagnostics); the study report "
            "draws the curve"
        )

    def run_name(self, variant: str, value: float) -> str:
        """The job's variant name: ``higgs-large.train_size-500`` (a directory name)."""
        return f"{variant}.{self.name}-{value}"


def _where(dataset: str, name: str | None = None) -> str:
    return f"diagnostics.{dataset}" + (f".{name}" if name else "")


def _value(where: str, value: Any) -> float:
    if isinstance(value, str):  # PyYAML reads 1e-05 (no dot) as a string; DVC as a number
        with contextlib.suppress(ValueError):
            value = int(value) if value.isdigit() else float(value)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise FitscopeError(f"{where}.values holds {value!r}. Fix: numbers >= 0, e.g. [500, 1000]")
    return value


def _diagnostic(dataset: str, name: str, spec: Any, specs: dict[str, dict[str, Any]]) -> Diagnostic:
    where = _where(dataset, name)
    check_name(where, name)
    if not isinstance(spec, dict) or not {"axis", "variants", "values"} <= set(spec):
        raise FitscopeError(f"{where} needs axis, variants and values. Fix: see params.yaml")
    if unknown := set(spec) - KEYS:
        raise FitscopeError(f"{where} has unknown keys {sorted(unknown)}. Fix: {sorted(KEYS)}")
    variants, values, origin = spec["variants"], spec["values"], spec.get("origin")
    if not all(isinstance(x, list) and x for x in (variants, values)):
        raise FitscopeError(f"{where}: variants and values must be non-empty lists. Fix: [a, b]")
    if len(set(map(str, variants))) < len(variants):
        raise FitscopeError(f"{where}.variants repeats a variant. Fix: list each variant once")
    numbers = [_value(where, v) for v in values]
    if len(set(numbers)) < len(numbers):
        raise FitscopeError(f"{where}.values repeats a value. Fix: list each value once")
    studies = {s["study"] for s in specs.values()}
    if f"{dataset}_{name}" in studies:  # its runs would mix with that study's in MLflow
        raise FitscopeError(
            f"{where} would be study {dataset}_{name}, which a variant's study already is. "
            "Fix: give the diagnostic another name"
        )
    for variant in [*variants, *([origin] if origin is not None else [])]:
        if not isinstance(variant, str) or specs.get(variant, {}).get("dataset") != dataset:
            raise FitscopeError(
                f"{where} names {variant!r}, which is not under variants.{dataset}. "
                f"Fix: one of {', '.join(n for n, s in specs.items() if s['dataset'] == dataset)}"
            )
    axis = spec["axis"]
    if not isinstance(axis, str) or not all(part.isidentifier() for part in axis.split(".")):
        raise FitscopeError(f"{where}.axis={axis!r} is not a config key. Fix: e.g. model.width")
    return Diagnostic(dataset, name, axis, tuple(variants), tuple(numbers), origin)


def diagnostics(params: dict[str, Any], dataset: str | None = None) -> list[Diagnostic]:
    """The diagnostics of params.yaml (of one dataset), checked: each names variants of
    its dataset and numeric values. No ``diagnostics`` section: none."""
    groups = params.get("diagnostics") or {}
    if not isinstance(groups, dict):
        raise FitscopeError("params.yaml's diagnostics is not a mapping. Fix: see params.yaml")
    specs = variant_specs(params)
    found = []
    for group, members in groups.items():
        if dataset is not None and group != dataset:
            continue
        if group not in params_section(params, "variants") or not isinstance(members, dict):
            raise FitscopeError(
                f"{_where(group)} is not a mapping under a dataset of variants. "
                "Fix: diagnostics: {<dataset>: {<name>: {axis: ..., variants: [...], ...}}}"
            )
        found += [_diagnostic(group, name, spec, specs) for name, spec in members.items()]
    return found


def check_stage_params(found: list[Diagnostic], dvc_yaml: Path = Path("dvc.yaml")) -> None:
    """Under DVC, every variant a diagnostic trains again must be a param of stage diagnose
    (by name, ``variants.<dataset>.<variant>``): else a change to it would not re-run it."""
    import yaml

    stage = (yaml.safe_load(dvc_yaml.read_text()).get("stages") or {}).get("diagnose") or {}
    listed = {str(p) for p in stage.get("params") or [] if isinstance(p, str)}
    for diag in found:
        for variant in diag.variants:
            key = f"variants.{diag.dataset}.{variant}"
            if not {key, f"variants.{diag.dataset}", "variants"} & listed:
                raise FitscopeError(
                    f"{_where(diag.dataset, diag.name)} trains {variant} again, but dvc.yaml's "
                    f"diagnose stage does not list param {key}. Fix: add it to its params"
                )


def diagnose_jobs(params: dict[str, Any], dataset: str | None, variant_job) -> list[list[str]]:
    """The jobs of stage ``diagnose``: each diagnostic's variants at each value (of every
    dataset, or of ``dataset``).

    ``variant_job(variant, study, name)``: that variant's overrides as the train stage
    runs it, under another study and name. Diagnostic runs log no model (they are points
    on a curve, not candidates for the registry). No diagnostics: no jobs.
    """
    jobs = []
    found = diagnostics(params, dataset)
    if os.environ.get("DVC_STAGE") == "diagnose":
        check_stage_params(found)
    for diag in found:
        for variant in diag.variants:
            for value in diag.values:
                job = variant_job(variant, diag.study, diag.run_name(variant, value))
                job = [o for o in job if o.split("=", 1)[0].lstrip("+~") != diag.axis]
                jobs.append(
                    [
                        *job,
                        f"{diag.axis}={value}",
                        f"study_description='{diag.description}'",
                        "logger.log_model=false",
                    ]
                )
    if not jobs and dataset is not None:
        raise FitscopeError(f"params.yaml has no diagnostics.{dataset}. Fix: add one")
    return jobs


def drop_diagnostics(repo: Path) -> None:
    """Switch a repository copy's diagnostics off: ``diagnostics: {}`` in params.yaml and no
    stage diagnose in dvc.yaml (for copies trimmed to fewer variants than it trains: the
    benchmark's and tests' one-variant studies)."""
    import yaml

    for name, edit in (
        ("params.yaml", lambda doc: doc | {"diagnostics": {}}),
        (
            "dvc.yaml",
            lambda doc: (
                doc | {"stages": {k: v for k, v in doc["stages"].items() if k != "diagnose"}}
            ),
        ),
    ):
        path = repo / name
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(edit(yaml.safe_load(path.read_text())), sort_keys=False))
