"""The MLflow model registry: a run's model as a registered version, and the alias that
moves to it only when it beats the model the alias names (MLflow's MetricThreshold)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.tracking.store import global_store

REFUSED_TAG = "fitscope.champion_refused"  # on a version the alias did not move to


@dataclass(frozen=True)
class PromotionRule:
    """When a candidate takes the alias from the version that holds it (params.yaml
    ``champion``): it must beat it in ``metric`` by MLflow's threshold semantics."""

    metric: str = "test/loss"
    greater_is_better: bool = False
    min_absolute_change: float | None = 0.001
    min_relative_change: float | None = None
    force: bool = False  # move the alias anyway

    @classmethod
    def from_params(cls, section: dict[str, Any] | None) -> PromotionRule:
        """The rule from params.yaml's ``champion`` section (defaults where it is absent)."""
        section = dict(section or {})
        unknown = set(section) - set(cls.__dataclass_fields__)
        if unknown:
            raise FitscopeError(
                f"params.yaml champion: unknown key(s) {', '.join(sorted(unknown))}. Fix: use "
                f"{', '.join(cls.__dataclass_fields__)}"
            )
        for key in ("min_absolute_change", "min_relative_change"):  # YAML reads 1e-3 as text
            section[key] = _positive_or_none(key, section.get(key, getattr(cls, key)))
        rule = cls(**section)
        if not rule.min_absolute_change and not rule.min_relative_change:
            raise FitscopeError(
                "params.yaml champion: set min_absolute_change or min_relative_change (a "
                "positive number). Fix: e.g. champion.min_absolute_change: 0.001"
            )
        lower_is_better = "loss" in rule.metric or "ece" in rule.metric
        if rule.greater_is_better == lower_is_better:
            better = "lower" if lower_is_better else "higher"
            raise FitscopeError(
                f"params.yaml champion: greater_is_better={rule.greater_is_better} for "
                f"{rule.metric}, whose better values are {better}. "
                f"Fix: set greater_is_better: {str(not lower_is_better).lower()}"
            )
        return rule

    def refusal(self, candidate: dict[str, float], baseline: dict[str, float]) -> str | None:
        """Why ``candidate`` (a run's metrics) may not replace ``baseline``, or None."""
        import mlflow
        from mlflow.models import MetricThreshold
        from mlflow.models.evaluation import EvaluationResult
        from mlflow.models.evaluation.validation import ModelValidationFailedException

        if self.force or not math.isfinite(baseline.get(self.metric, math.nan)):
            return None  # no champion's figure to beat
        if not math.isfinite(candidate.get(self.metric, math.nan)):
            return f"the candidate's run has no finite {self.metric} metric"
        threshold = MetricThreshold(
            min_absolute_change=self.min_absolute_change or None,
            min_relative_change=self.min_relative_change or None,
            greater_is_better=self.greater_is_better,
        )
        logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)
        try:
            mlflow.validate_evaluation_results(
                {self.metric: threshold},
                EvaluationResult({self.metric: candidate[self.metric]}, {}),
                EvaluationResult({self.metric: baseline[self.metric]}, {}),
            )
        except ModelValidationFailedException as exc:
            return " ".join(str(exc).split())
        return None


def _positive_or_none(key: str, value: Any) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise FitscopeError(
            f"params.yaml champion.{key}: {value!r} is not a number >= 0. Fix: e.g. 0.001"
        )
    return number or None


@dataclass(frozen=True)
class Promotion:
    """What registering a candidate did: its version, and the version the alias names."""

    version: str
    alias_version: str
    refused: str | None = None  # why the alias stayed where it was

    @property
    def moved(self) -> bool:
        return self.refused is None


def holder(client, name: str, alias: str) -> Any | None:
    """The version ``alias`` names, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def promote(
    client,
    name: str,
    model_uri: str,
    run_id: str,
    alias: str,
    tags: dict[str, str],
    description: str,
    model_description: str,
    rule: PromotionRule,
) -> Promotion:
    """Register ``model_uri`` (unless the alias names its run already) and move ``alias``
    to it when ``rule`` lets it beat the version that holds the alias."""
    current = holder(client, name, alias)
    if current is not None and current.run_id == run_id and not rule.force:
        return Promotion(str(current.version), str(current.version))  # the champion already
    refused = None
    if current is not None:
        candidate = client.get_run(run_id).data.metrics
        refused = rule.refusal(candidate, _metrics(client, current.run_id))
    # A candidate refused before (the same report again) keeps its version.
    earlier = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = (
        str(max(int(v.version) for v in earlier))
        if earlier
        else register_version(client, name, model_uri, run_id, tags, description, model_description)
    )
    if refused is None:
        client.set_registered_model_alias(name, alias, version)
        return Promotion(version, version)
    client.set_model_version_tag(name, version, REFUSED_TAG, f"@{alias}: {refused}"[:5000])
    return Promotion(version, str(current.version), refused)


def _metrics(client, run_id: str) -> dict[str, float]:
    """A run's metrics; none for a run that is gone (``mlflow gc``): nothing to beat."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id).data.metrics
    except MlflowException:
        return {}


def register_version(
    client,
    name: str,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    description: str,
    model_description: str,
) -> str:
    """Register ``model_uri`` as a new version of ``name``.

    The version carries ``tags`` and ``description``; the registered model gets
    ``model_description`` when it is created. Returns the version number.
    """
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=model_description)
    # A tracking server only accepts a logged model's `models:/<model_id>` source when the
    # request names that model id too (a local store infers it).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    # A local store looks the logged model up through MLflow's global URI: make it this one.
    with global_store(client.tracking_uri):
        version = client.create_model_version(
            name, model_uri, run_id=run_id, tags=tags, description=description, model_id=model_id
        )
    return str(version.version)
