"""The champion gate: an alias moves only to a version that beats the one it names, by
MLflow's own threshold semantics (mlflow.validate_evaluation_results)."""

from __future__ import annotations

import pytest

from fitscope.core.errors import FitscopeError
from fitscope.tracking.registry import REFUSED_TAG, PromotionRule, promote
from fitscope.tracking.store import get_client

RULE = PromotionRule(metric="test/loss", min_absolute_change=0.01)


def test_the_rule_follows_mlflows_threshold_semantics():
    assert RULE.refusal({"test/loss": 0.50}, {"test/loss": 0.60}) is None
    refused = RULE.refusal({"test/loss": 0.595}, {"test/loss": 0.60})
    assert "minimum absolute change check failed" in refused and "0.595" in refused
    assert RULE.refusal({"test/loss": 0.70}, {"test/loss": 0.60}) is not None
    accuracy = PromotionRule(metric="test/acc", greater_is_better=True, min_relative_change=0.1)
    assert accuracy.refusal({"test/acc": 0.90}, {"test/acc": 0.80}) is None
    assert accuracy.refusal({"test/acc": 0.85}, {"test/acc": 0.80}) is not None
    assert PromotionRule(force=True).refusal({"test/loss": 9.0}, {"test/loss": 0.1}) is None
    assert RULE.refusal({"test/loss": 0.5}, {}) is None  # a champion without the metric


def test_a_bad_rule_in_params_is_one_line():
    with pytest.raises(FitscopeError, match=r"unknown key.*threshold\. Fix: use metric"):
        PromotionRule.from_params({"threshold": 0.5})
    with pytest.raises(FitscopeError, match="set min_absolute_change or min_relative_change"):
        PromotionRule.from_params({"min_absolute_change": None})
    assert PromotionRule.from_params(None) == PromotionRule()
    assert PromotionRule.from_params({"min_absolute_change": "1e-3"}).min_absolute_change == 0.001
    with pytest.raises(FitscopeError, match=r"whose better values are higher\. Fix: set"):
        PromotionRule.from_params({"metric": "test/acc"})  # greater_is_better: false
    nan = {"test/loss": float("nan")}
    assert "no finite test/loss" in RULE.refusal(nan, {"test/loss": 0.6})
    assert RULE.refusal({"test/loss": 0.6}, nan) is None  # nothing to beat


def _run_with_model(client, experiment_id: str, test_loss: float) -> tuple[str, str]:
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "test/loss", test_loss)
    client.set_terminated(run.info.run_id)
    return run.info.run_id, f"{run.info.artifact_uri}/model"


def _promote(client, run_id: str, source: str, rule: PromotionRule = RULE):
    return promote(client, "m", source, run_id, "champion", {}, "a version", "the model", rule)


def test_the_alias_moves_only_to_a_better_model(tmp_path):
    client = get_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    first = _promote(client, *_run_with_model(client, exp, 0.60))  # no champion yet
    assert first.moved and first.version == "1"

    worse_run = _run_with_model(client, exp, 0.605)
    worse = _promote(client, *worse_run)
    assert not worse.moved and worse.version == "2" and worse.alias_version == "1"
    assert _promote(client, *worse_run).version == "2"  # refused again: no new version
    assert client.get_model_version_by_alias("m", "champion").version == 1
    tags = client.get_model_version("m", "2").tags
    assert tags[REFUSED_TAG].startswith("@champion: Metric test/loss minimum absolute change")

    better = _promote(client, *_run_with_model(client, exp, 0.50))
    assert better.moved and client.get_model_version_by_alias("m", "champion").version == 3
    assert REFUSED_TAG not in client.get_model_version("m", "3").tags

    # The champion's own run again (a report re-run): nothing new is registered.
    run_id = client.get_model_version("m", "3").run_id
    again = _promote(client, run_id, "unused")
    assert again.version == "3" and len(client.search_model_versions("name = 'm'")) == 3

    forced = _promote(client, *_run_with_model(client, exp, 0.90), PromotionRule(force=True))
    assert forced.moved and client.get_model_version_by_alias("m", "champion").version == 4
