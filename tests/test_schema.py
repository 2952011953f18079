"""The config schema: unknown keys, wrong types, NaN/inf, ranges and names refused up front."""

from __future__ import annotations

import math
import os
import re

import pytest
from conftest import REPO, compose, last_error_line, run_train, runs_of
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from fitscope.core.errors import FitscopeError
from fitscope.pipeline.schema import check
from fitscope.pipeline.sweeps import usage_error
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.store import get_client


def nothing_created(tmp_path) -> None:
    """No MLflow store, run directory or sweep directory exists in ``tmp_path``."""
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "outputs").exists()
    assert not (tmp_path / "multirun").exists()
    assert not (tmp_path / "mlartifacts").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["+model.widht=32"], "unknown config key model.widht. Fix: check its spelling"),
        (["+foo=1"], "unknown config key foo. Fix:"),
        (["foo=1"], "Could not override 'foo'"),
        (["model=huge"], "Could not find 'model/huge'. Fix: use one of full, large, medium"),
        (["regularization.dropout=nan"], "regularization.dropout=nan must be a finite number"),
        (["regularization.l2=nan"], "regularization.l2=nan must be a finite number"),
        (["optimizer.lr=inf"], "optimizer.lr=inf must be a finite number"),
        (["model.width=1.5"], "Value '1.5' of type 'float' could not be converted to Integer"),
        (["variant=../../../x"], "variant='../../../x' is not a valid name"),
        (["study=../../x"], "study='../../x' is not a valid name"),
        (["optimizer=sgd", "+optimizer.betas=[0.9,0.9]"], "unknown config key optimizer.betas"),
        (["-m", "model=tiny,huge"], "sweep job ['model=huge']: In 'train': Could not find"),
        (["-m", "regularization.dropout=0.1,nan"], "sweep job regularization.dropout=nan:"),
    ],
)
@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_usage_errors_are_one_line_exit_2_and_create_nothing(args, message, tmp_path):
    proc = run_train(args, tmp_path, f"sqlite:///{tmp_path / 'mlflow.db'}")
    line = last_error_line(proc, 2)
    assert line.startswith("fitscope: error: ")
    assert message in line
    assert "Fix:" in line
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    nothing_created(tmp_path)


@pytest.mark.slow
def test_a_sweep_with_one_bad_job_creates_no_parent_run(processed_dir, tmp_path, mlflow_uri):
    """The store exists already (an earlier study); the bad sweep adds nothing to it."""
    client = get_client(mlflow_uri)
    ensure_experiment(client, "t_bad_sweep")
    proc = run_train(
        [
            *("-m", f"paths.data_dir={processed_dir}", "trainer=debug", "study=t_bad_sweep"),
            *("model=tiny,small", "regularization.dropout=0.0,1.5"),
        ],
        tmp_path,
        mlflow_uri,
    )
    assert "regularization.dropout=1.5 must be < 1.0" in last_error_line(proc, 2)
    parents, children = runs_of(client, "t_bad_sweep")
    assert parents == [] and children == []
    assert not (tmp_path / "multirun").exists()


def test_each_sweep_invocation_gets_its_own_directory():
    """Two sweeps started in the same second differ by their process id."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        sweep_dir = str(cfg.hydra.sweep.dir)
    finally:
        HydraConfig.instance().cfg = None
    assert re.fullmatch(
        rf"multirun/adhoc/\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d-{os.getpid()}", sweep_dir
    )


# --- property-based: any value for any key ends in a valid config or one clear error -------------
KEYS = [
    "model.width",
    "model.depth",
    "model.activation",
    "regularization.dropout",
    "regularization.l2",
    "regularization.augment_shift",
    "optimizer.lr",
    "optimizer.eps",
    "data.batch_size",
    "data.train_size",
    "trainer.max_epochs",
    "trainer.num_threads",
    "callbacks.early_stopping.patience",
    "callbacks.early_stopping.min_delta",
    "scheduler.decay_epochs",
    "seed",
    "variant",
    "study",
    "objective",
]
VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.sampled_from(["nan", "inf", "-inf", "null", "true", "''", "../x", "a b", "1e400", "[1,2]"]),
    st.text(alphabet="abcxyz019._-/", min_size=1, max_size=8),
)


def compose_and_check(key: str, value: str, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    cfg = compose("trainer=debug", f"paths.run_dir={tmp_path}", f"{key}={value}")
    HydraConfig.instance().cfg = None  # plain compose: no Hydra run is active
    return check(cfg)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_any_value_is_a_valid_config_or_one_line_error(key, value, tmp_path):
    try:
        checked = compose_and_check(key, value, tmp_path)
    except FitscopeError as exc:
        message = str(exc)
    except (HydraException, OmegaConfBaseException) as exc:
        message = usage_error(exc)
    else:
        # Accepted: then the value really is sane.
        reg, opt = checked.regularization, checked.optimizer
        assert 0 <= reg.dropout < 1 and math.isfinite(reg.l2) and reg.l2 >= 0
        assert opt.lr > 0 and math.isfinite(opt.lr)
        assert checked.model.width >= 1 and checked.data.batch_size >= 1
        assert ".." not in checked.variant and "/" not in checked.study
        return
    assert "\n" not in message and "Fix:" in message, message
