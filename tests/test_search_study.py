"""The search's study without training: where it is stored, its space, the bookkeeping of
its trials (owners, interrupted trials continued, the budget) and the per-epoch feed."""

from __future__ import annotations

import subprocess
import sys

import optuna
import psutil
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from fitscope.core.errors import FitscopeError
from fitscope.core.process import Owner
from fitscope.search.feed import TrialFeed
from fitscope.search.space import override_line, split_space
from fitscope.search.storage import (
    STACK_STORAGE_ENV,
    describe,
    load_recorded_study,
    open_storage,
    reachable_url,
    resolve_storage,
)
from fitscope.search.trials import (
    claim,
    continue_orphans,
    continue_trial,
    finished_count,
    sampler_offset,
    trial_name,
    used_budget,
)

SPACE = {"optimizer.lr": FloatDistribution(1e-6, 1e-2, log=True)}


def test_storage_is_a_journal_beside_the_outputs_unless_named(tmp_path, monkeypatch):
    monkeypatch.delenv(STACK_STORAGE_ENV, raising=False)
    sweep_dir = tmp_path / "multirun" / "s" / "2026-12-06_10-00-00-1"
    assert resolve_storage("auto", sweep_dir) == str(tmp_path / "multirun" / "s" / "optuna.journal")
    assert resolve_storage(None, sweep_dir) is None and resolve_storage("null", sweep_dir) is None
    url = "postgresql+psycopg2://postgres:secret@127.0.0.1:25432/optuna"
    assert resolve_storage(url, sweep_dir) == url
    monkeypatch.chdir(tmp_path)
    assert resolve_storage("studies/x.journal", sweep_dir) == str(tmp_path / "studies/x.journal")
    monkeypatch.setenv(STACK_STORAGE_ENV, url)  # the team stack is up
    assert resolve_storage("auto", sweep_dir) == url
    assert describe(url) == "postgresql+psycopg2://postgres:***@127.0.0.1:25432/optuna"


def test_an_unwritable_journal_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(FitscopeError, match=r"hydra.sweeper.storage=.*Fix: set hydra.sweeper"):
        open_storage(str(tmp_path / "file" / "optuna.journal"))


def test_the_space_comes_from_hydra_sweep_overrides():
    parsed = OverridesParser.create().parse_overrides(
        ["optimizer.lr=tag(log, interval(1e-6, 1e-2))", "model=a,b", "trainer.max_epochs=3"]
    )
    fixed, space = split_space(parsed)
    assert fixed == ["trainer.max_epochs=3"]
    assert space == {
        "optimizer.lr": FloatDistribution(1e-6, 1e-2, log=True),
        "model": CategoricalDistribution(("a", "b")),
    }
    assert override_line("optimizer.lr", 1 / 3) == f"optimizer.lr={1 / 3!r}"
    reversed_range = OverridesParser.create().parse_overrides(["x=tag(log, interval(1, 0.1))"])
    with pytest.raises(FitscopeError, match=r"empty or reversed\. Fix: give interval"):
        split_space(reversed_range)


def _study(tmp_path, **kwargs):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    return optuna.create_study(study_name="s", storage=storage, load_if_exists=True, **kwargs)


def _dead_owner() -> Owner:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    owner = Owner.of(proc.pid)
    proc.kill()
    proc.wait()
    assert owner.alive() is False
    return owner


def test_a_dead_owners_trial_continues_under_its_name_and_counts_once(tmp_path):
    study = _study(tmp_path, direction="maximize")
    done = study.ask(SPACE)
    claim(done, Owner.current())
    study.tell(done, 0.5)
    orphan = study.ask(SPACE)
    assert claim(orphan, _dead_owner()) == "trial-1"
    live = study.ask(SPACE)
    claim(live, Owner.current())  # a live process's trial is left alone
    assert used_budget(study) == 3 and finished_count(study) == 1

    assert continue_orphans(study) == ["trial-1"]
    assert continue_orphans(study) == []  # done once
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING, TrialState.WAITING]
    # The failed orphan no longer counts; its continuation counts once it is asked (a
    # budget of 3 leaves room for it even when it is the last trial).
    assert used_budget(study) == 2 and finished_count(study) == 1
    again = study.ask(SPACE)  # the continuation: the orphan's values and name
    assert again.number == 3 and again.params == orphan.params
    assert trial_name(again) == "trial-1" and used_budget(study) == 3
    assert not continue_trial(study, done, "finished trials are never continued")


def test_an_interrupted_trial_without_a_continuation_gets_one(tmp_path):
    """A signal between failing an interrupted trial and enqueueing its values."""
    study = _study(tmp_path)
    trial = study.ask(SPACE)
    claim(trial, Owner.current())
    trial.set_user_attr("fitscope.interrupted", "the search was interrupted")
    study.tell(trial, state=TrialState.FAIL)
    assert continue_orphans(study) == ["trial-0"]
    assert continue_orphans(study) == []
    waiting = study.ask(SPACE)
    assert waiting.params == trial.params and trial_name(waiting) == "trial-0"


def test_each_sweeper_process_seeds_its_sampler_apart(tmp_path):
    study = _study(tmp_path)
    first, second = Owner.current(), Owner.of(psutil.Process().ppid())
    assert sampler_offset(study, first) == 0  # a new search draws what its seed says
    later = sampler_offset(study, second)
    assert later > 0 and sampler_offset(study, second) == later  # its own, and stable


def test_the_feed_reports_epochs_and_the_pruner_decides(tmp_path):
    study = _study(tmp_path, direction="maximize")
    trial = study.ask(SPACE)
    pruner = optuna.pruners.ThresholdPruner(lower=0.5, n_warmup_steps=1)
    feed = TrialFeed(str(tmp_path / "optuna.journal"), "s", trial.number, pruner)
    assert feed.report(0, 0.1) is False  # warm-up
    assert feed.report(1, 0.6) is False
    assert feed.report(2, 0.2) is True and feed.pruned_at == 2
    fresh = study.get_trials()[0]
    assert fresh.intermediate_values == {0: 0.1, 1: 0.6, 2: 0.2}
    assert fresh.user_attrs["fitscope.pruned_at_epoch"] == 2
    with pytest.raises(FitscopeError, match="trial 7 of study 's' is not in"):
        TrialFeed(str(tmp_path / "optuna.journal"), "s", 7, pruner)


def test_a_report_finds_the_study_only_where_it_is_reachable(tmp_path, monkeypatch):
    _study(tmp_path).ask(SPACE)
    journal = str(tmp_path / "optuna.journal")
    assert len(load_recorded_study("s", journal).trials) == 1
    assert load_recorded_study("s", "memory (not kept after the search)") is None
    assert load_recorded_study("s", str(tmp_path / "gone.journal")) is None
    monkeypatch.delenv(STACK_STORAGE_ENV, raising=False)
    assert load_recorded_study("s", "postgresql://u:***@127.0.0.1:1/optuna") is None


def test_a_trials_database_password_stays_out_of_its_record(processed_dir, tmp_path):
    from conftest import compose

    from fitscope.pipeline.identity import recorded_config, run_config

    url = "postgresql+psycopg2://postgres:secret@127.0.0.1:25432/optuna"
    cfg = compose(
        f"paths.data_dir={processed_dir}",
        f"paths.run_dir={tmp_path}",
        "trial.number=3",
        f"trial.storage='{url}'",
    )
    assert recorded_config(cfg)["trial"] == {
        "number": 3,
        "study": None,
        "storage": "postgresql+psycopg2://postgres:***@127.0.0.1:25432/optuna",
    }
    assert "trial" not in run_config(cfg)  # nor in the config hash


def test_every_sampler_and_pruner_preset_builds_its_optuna_class():
    from hydra.core.config_store import ConfigStore
    from hydra.utils import instantiate

    import hydra_plugins.fitscope_sweeper  # noqa: F401  (registers the presets)

    store = ConfigStore.instance()
    expected = {
        "sampler": {"tpe": "TPESampler", "random": "RandomSampler"},
        "pruner": {
            "none": "NopPruner",
            "median": "MedianPruner",
            "hyperband": "HyperbandPruner",
            "threshold": "ThresholdPruner",
        },
    }
    for group, names in expected.items():
        for name, cls in names.items():
            node = store.load(f"hydra/sweeper/{group}/{name}.yaml").node
            if group == "pruner" and name == "threshold":
                node.lower = 0.5  # Optuna wants a bound
            assert type(instantiate(node)).__name__ == cls, (group, name)


def test_a_trial_reaches_a_database_whose_password_is_not_in_its_config(tmp_path, monkeypatch):
    from fitscope.pipeline.search import trial_overrides

    url = "postgresql+psycopg2://postgres:secret@127.0.0.1:25432/optuna"
    trial = _study(tmp_path).ask(SPACE)
    job = trial_overrides(trial, "trial-0", ["trainer.max_epochs=3"], "s", url)
    assert not [o for o in job if "secret" in o]
    assert "trial.storage='postgresql+psycopg2://postgres:***@127.0.0.1:25432/optuna'" in job
    monkeypatch.delenv(STACK_STORAGE_ENV, raising=False)
    with pytest.raises(FitscopeError, match=r"cannot reach\. Fix: export FITSCOPE_OPTUNA_STORAGE"):
        TrialFeed(describe(url), "s", 0, None)
    monkeypatch.setenv(STACK_STORAGE_ENV, url)  # stack.env: the masked URL is this one
    assert reachable_url(describe(url)) == url


def test_a_trial_the_study_already_ended_is_no_longer_reported_to(tmp_path):
    study = _study(tmp_path, direction="maximize")
    trial = study.ask(SPACE)
    feed = TrialFeed(str(tmp_path / "optuna.journal"), "s", trial.number, None)
    assert feed.report(0, 0.3) is False
    continue_trial(study, trial, "its sweeper process ended before the trial did")
    assert feed.report(1, 0.4) is False and feed.detached  # no error: training goes on
