"""The diagnostics' computations on synthetic histories and points: the double-descent
label, seed bands and counts, the paired interval, the readings of a learning curve and a
validation curve; params.yaml's diagnostics and the jobs of stage diagnose."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import yaml

from fitscope.core.errors import FitscopeError
from fitscope.pipeline.diagnostics import check_stage_params, diagnose_jobs, diagnostics
from fitscope.results.bands import epoch_band, paired_difference
from fitscope.results.diagnostics import Point, curve_reading, size_reading, turns
from fitscope.results.verdict import double_descent, seed_count, verdict

REPO = Path(__file__).resolve().parents[1]


def history(val, train=None):
    train = train or [0.7 - 0.001 * i for i in range(len(val))]
    return [
        {"epoch": i, "train/loss": t, "val/loss": v}
        for i, (t, v) in enumerate(zip(train, val, strict=True))
    ]


def noisy(values, amplitude=0.002, seed=0):
    rng = random.Random(seed)
    return [v + rng.uniform(-amplitude, amplitude) for v in values]


def test_a_second_lower_descent_is_double_descent_not_overfitting():
    # Down to 0.60 at epoch 50, up to 0.66 by epoch 100, down to 0.55 by 200, then flat.
    val = [0.70 - 0.002 * i for i in range(50)]
    val += [0.60 + 0.0012 * i for i in range(50)]
    val += [0.66 - 0.0011 * i for i in range(100)]
    val += [0.55 + 0.0005 * i for i in range(100)]  # and a late rise: overfitting before
    hist = history(noisy(val))
    assert double_descent(hist)
    assert verdict(hist, best_val_in_dataset=0.5) == "double descent"


def test_plain_overfitting_and_a_noisy_descent_are_not_double_descent():
    val = [0.70 - 0.002 * i for i in range(50)] + [0.60 + 0.001 * i for i in range(100)]
    over = history(noisy(val))
    assert not double_descent(over)
    assert verdict(over, best_val_in_dataset=0.5) == "overfitting"
    # Still descending under noise of +-0.05 (a 100-digit validation set): a noisy bump
    # followed by a lower value is noise, not a second descent.
    descending = noisy([2.0 * math.exp(-i / 15) + 0.35 for i in range(60)], 0.05, seed=3)
    assert not double_descent(history(descending))
    assert not double_descent(history([0.7, 0.6]))  # too short to tell
    # A long noisy descent that flattens (the classic mnist-augment: 301 epochs of SGD on
    # 300 digits, 100 validation digits): over 40 noise draws none is a double descent
    # (with the verdict's 10-epoch window instead of a tenth of the run, 7 of them were).
    for seed in range(40):
        rng = random.Random(seed)
        flat = [0.45 + 1.8 * math.exp(-i / 40) + rng.gauss(0, 0.05) for i in range(301)]
        assert not double_descent(history(flat)), seed
    # One spike early in a plain descent is neither a first minimum nor a second descent.
    spiked = [0.70 - 0.001 * i for i in range(100)]
    spiked[1] = 0.80
    assert not double_descent(history(noisy(spiked, 0.0005)))


def test_verdicts_are_counted_per_seed():
    assert seed_count(["overfitting"]) == "overfitting"
    assert seed_count(["overfitting"] * 3) == "overfitting (3/3 seeds)"
    assert (
        seed_count(["good fit", "overfitting", "good fit"])
        == "good fit (2/3 seeds), overfitting (1/3 seeds)"
    )


def test_the_band_averages_the_seeds_that_reached_each_epoch():
    band = epoch_band([history([0.7, 0.6, 0.5]), history([0.9, 0.8])], "val/loss")
    assert band.x == [1.0, 2.0, 3.0]
    assert band.mean == pytest.approx([0.8, 0.7, 0.5])
    assert band.std == pytest.approx([math.sqrt(0.02), math.sqrt(0.02), 0.0])
    assert band.low[0] == pytest.approx(0.8 - math.sqrt(0.02))


def test_the_paired_interval_compares_seed_by_seed():
    baseline = {"0": 0.60, "1": 0.65, "2": 0.62}
    # The regularizer is lower by 0.02-0.03 on every seed, though the seeds differ by 0.05.
    lower = paired_difference({"0": 0.58, "1": 0.62, "2": 0.595}, baseline)
    assert lower.pairs == 3 and lower.mean == pytest.approx(-0.025)
    # The paired t interval: mean -0.025, sd 0.005, t(0.975, 2 df) = 4.303.
    assert (lower.low, lower.high) == pytest.approx((-0.0374, -0.0126), abs=1e-4)
    assert lower.reading() == "lower (better)"
    mixed = paired_difference({"0": 0.61, "1": 0.64, "2": 0.625}, baseline)
    assert mixed.low < 0 < mixed.high and mixed.reading() == "no clear difference"
    same = paired_difference({"0": 0.61, "1": 0.66, "2": 0.63}, baseline)  # +0.01 each
    assert (same.low, same.high) == pytest.approx((0.01, 0.01))
    assert same.reading() == "higher (worse)"
    one = paired_difference({"0": 0.58, "5": 0.1}, baseline)  # seed 5: no baseline
    assert (one.pairs, one.low) == (1, None) and "one seed" in one.reading()


def point(value, val, train, verdicts=("good fit",)):
    return Point(value, [val], [train], list(verdicts))


def test_a_learning_curve_is_read_from_its_gap_and_slope():
    closing = [point(500, 0.70, 0.40), point(2000, 0.65, 0.55), point(8984, 0.61, 0.58)]
    assert size_reading(closing).startswith("more data helps")
    flat = [point(500, 0.66, 0.64), point(2000, 0.655, 0.65), point(8984, 0.655, 0.652)]
    assert size_reading(flat).startswith("capacity-bound")
    open_gap = [point(500, 0.70, 0.40), point(2000, 0.66, 0.40), point(8984, 0.66, 0.41)]
    assert "regularization may close the gap" in size_reading(open_gap)
    assert size_reading(closing[:1]) == "one size only: no curve to read"


def test_a_validation_curve_marks_its_best_point_and_turns():
    over = ("overfitting",)
    points = [
        point(0, 0.61, 0.50, over),
        point(0.001, 0.60, 0.58),
        point(0.01, 0.64, 0.64, ("underfitting",)),
    ]
    assert turns(points) == [(0, 0.001)]
    assert curve_reading(points, "regularization.l2") == (
        "best at regularization.l2 = 0.001 (validation loss 0.6000); "
        "overfitting at regularization.l2 = 0"
    )


def params_with(diagnostic):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["diagnostics"] = {"higgs": {"d": diagnostic}}
    return params


@pytest.mark.parametrize(
    ("diagnostic", "message"),
    [
        ({"axis": "model.width", "variants": ["mnist-none"], "values": [8]}, "not under"),
        ({"axis": "model.width", "variants": ["higgs-large"], "values": ["x"]}, "holds 'x'"),
        ({"axis": "model.width", "variants": ["higgs-large"]}, "needs axis"),
        ({"axis": "$(rm)", "variants": ["higgs-large"], "values": [8]}, "not a config key"),
        ({"axis": "a", "variants": ["higgs-large"], "values": [8], "step": 2}, "unknown"),
        ({"axis": "model.width", "variants": ["higgs-large"], "values": []}, "non-empty"),
        ({"axis": "model.width", "variants": ["higgs-large"], "values": [8, 8]}, "repeats"),
        ({"axis": "model.width", "variants": ["higgs-large"] * 2, "values": [8]}, "repeats a var"),
        ({"axis": "model.width", "variants": ["higgs-large"], "values": [".nan"]}, "holds"),
    ],
)
def test_a_bad_diagnostic_is_a_one_line_error(diagnostic, message):
    with pytest.raises(FitscopeError, match=message):
        diagnostics(params_with(diagnostic))


def test_a_diagnostic_named_like_a_study_is_refused_and_1e_minus_5_is_a_number():
    params = params_with(
        {"axis": "regularization.l2", "variants": ["higgs-l2"], "values": ["1e-05"]}
    )
    (found,) = diagnostics(params)
    assert found.values == (1e-05,) and found.run_name("higgs-l2", 1e-05) == "higgs-l2.d-1e-05"
    params["diagnostics"] = {
        "mnist": {"dropout": {"axis": "a", "variants": ["mnist-none"], "values": [1]}}
    }
    with pytest.raises(FitscopeError, match="would be study mnist_dropout"):
        diagnostics(params)
    params["diagnostics"] = {}  # switched off: no jobs, the stage leaves an empty folder
    assert diagnose_jobs(params, None, lambda *a: []) == []


def test_the_jobs_train_each_variant_again_at_each_value():
    params = params_with({"axis": "model.width", "variants": ["higgs-large"], "values": [8, 32]})

    def variant_job(variant, study, name):
        return ["+experiment=x", "model.width=512", f"study={study}", f"variant={name}"]

    jobs = diagnose_jobs(params, "higgs", variant_job)
    described = (
        "study_description='HIGGS diagnostic d: higgs-large trained again at model.width = 8, "
        "32 (params.yaml diagnostics); the study report draws the curve'"
    )
    assert jobs == [
        [
            "+experiment=x",
            "study=higgs_d",
            f"variant=higgs-large.d-{width}",
            f"model.width={width}",
            described,
            "logger.log_model=false",
        ]
        for width in (8, 32)
    ]
    from fitscope.pipeline.sweeps import parse_overrides

    assert parse_overrides(jobs[0])[4].value() == described.split("=", 1)[1].strip("'")
    with pytest.raises(FitscopeError, match=r"no diagnostics\.mnist"):
        diagnose_jobs(params, "mnist", variant_job)


def test_dvc_yaml_lists_every_variant_the_diagnostics_train_again(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    found = diagnostics(params)
    assert {d.study for d in found} >= {"higgs_train_size", "mnist_train_size", "higgs_l2"}
    check_stage_params(found, REPO / "dvc.yaml")
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text())
    dvc_yaml["stages"]["diagnose"]["params"].remove("variants.higgs.higgs-medium")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml))
    with pytest.raises(FitscopeError, match=r"does not list param variants\.higgs\.higgs-medium"):
        check_stage_params(found, tmp_path / "dvc.yaml")


def test_calibration_curves_are_averaged_over_seeds_on_a_common_grid():
    from fitscope.report.calibration import _on_grid, _reliability

    diagonal = [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 1.0, "tpr": 1.0}]
    bowed = [{"fpr": 0.0, "tpr": 0.0}, {"fpr": 0.5, "tpr": 1.0}, {"fpr": 1.0, "tpr": 1.0}]
    band = _on_grid([diagonal, bowed], "fpr", "tpr")
    assert len(band.x) == 101 and band.x[50] == pytest.approx(0.5)
    assert band.mean[50] == pytest.approx(0.75) and band.std[50] == pytest.approx(0.3536, 1e-3)
    # Reliability: a bin only one seed has keeps that seed's accuracy, std 0.
    seed0 = [{"bin_low": 0.6, "confidence": 0.65, "accuracy": 0.6}]
    seed1 = [
        {"bin_low": 0.6, "confidence": 0.63, "accuracy": 0.7},
        {"bin_low": 0.9, "confidence": 0.95, "accuracy": 0.9},
    ]
    reliability, confidence = _reliability([seed0, seed1])
    assert confidence == pytest.approx([0.64, 0.95])
    assert reliability.mean == pytest.approx([0.65, 0.9]) and reliability.std[1] == 0.0


def test_seed_directories_come_in_seed_order(tmp_path):
    from fitscope.results.seeds import seed_dirs

    for seed in ("10", "2", "0"):
        (tmp_path / seed).mkdir()
        (tmp_path / seed / "metrics.json").write_text("{}")
    assert [d.name for d in seed_dirs(tmp_path)] == ["0", "2", "10"]  # not "10" before "2"


def test_diagnostics_switched_off_leave_an_empty_output_and_train_nothing(tmp_path):
    import subprocess
    import sys

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["diagnostics"] = {}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cli = [sys.executable, "-m", "fitscope.cli", "diagnose"]
    done = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "nothing to train" in done.stdout
    assert (tmp_path / "runs" / "diagnostics").is_dir()
    assert not any((tmp_path / "runs" / "diagnostics").iterdir())
    params["diagnostics"] = {
        "higgs": {"d": {"axis": "model.width", "variants": ["x"], "values": [8]}}
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    bad = subprocess.run(cli, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "diagnostics.higgs.d names 'x'" in bad.stderr
