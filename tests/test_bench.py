"""make bench: every code path runs (its smoke mode), and its figures are merged into
reports/bench.json, never replace it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, venv_env

from fitscope.bench.record import print_table, record
from fitscope.bench.study import fidelity


def test_record_merges_into_an_existing_file(tmp_path):
    path = tmp_path / "reports" / "bench.json"
    record({"ingest_s_per_11M_rows": 40.0, "tracking_overhead": 0.5}, path)  # another bench
    merged = record({"tracking_overhead": 0.01, "large_gflops": 70.0}, path)
    expected = {"ingest_s_per_11M_rows": 40.0, "tracking_overhead": 0.01, "large_gflops": 70.0}
    assert merged == expected
    assert json.loads(path.read_text()) == expected


def test_fidelity_compares_each_variant_with_the_published_study(tmp_path, capsys):
    published, now = tmp_path / "published.csv", tmp_path / "now.csv"
    head = "dataset,variant,val loss,selected epoch,verdict,wall time (s)\n"
    published.write_text(
        head + "higgs,higgs-l2,0.5823,323,overfitting,595.4\nhiggs,higgs-gone,0.6,1,good fit,1\n"
        "dataset,variant,val loss,val acc,selected epoch,verdict\n"
        "mnist,mnist-none,0.7024,0.79,300,overfitting\n"
    )
    now.write_text(
        head + "higgs,higgs-l2,0.5810 ± 0.0020,320,overfitting,99.0\n"
        "dataset,variant,val loss,val acc,selected epoch,verdict\n"
        'mnist,mnist-none,0.7164,0.80,300,"good fit (2/3 seeds), overfitting (1/3 seeds)"\n'
    )
    drift = fidelity(now, published)
    assert drift["study_val_loss_max_delta"] == pytest.approx(0.014)
    assert drift["study_verdicts_changed"] == 1  # the majority verdict is compared
    assert drift["study_variants_missing"] == 1  # higgs-gone
    assert drift["study_fidelity"] == {
        "higgs-l2": {
            "val loss": ["0.5823", "0.5810 ± 0.0020"],
            "selected epoch": ["323", "320"],
            "verdict": ["overfitting", "overfitting"],
        },
        "mnist-none": {
            "val loss": ["0.7024", "0.7164"],
            "selected epoch": ["300", "300"],
            "verdict": ["overfitting", "good fit (2/3 seeds), overfitting (1/3 seeds)"],
        },
    }
    nothing = fidelity(now, tmp_path / "no-published-results.csv")
    assert set(nothing) == set(drift) and set(nothing.values()) == {None}
    print_table(drift)  # the bench prints the table this way
    shown = capsys.readouterr().out
    assert "higgs-l2          0.5823 / 0.5810 ± 0.0020  323 / 320" in shown
    assert "study_verdicts_changed" in shown and "(goal 0)" in shown


@pytest.mark.slow
def test_bench_smoke_runs_every_path_to_its_end(tmp_path):
    """`python -m fitscope.bench --smoke`: each measurement of `make bench` at tiny sizes
    (the tiny and large loops, tracking with a logged model, checkpoints, the GPU path on
    the CPU, a tracking server under load, the study, start-up and ingest). A signature
    change like the one that broke `make bench` (RunTracker.log_model's step) fails here."""
    out = tmp_path / "bench.json"
    before = (
        (REPO / "reports" / "bench.json").read_bytes()
        if (REPO / "reports" / "bench.json").exists()
        else None
    )
    proc = subprocess.run(
        [sys.executable, "-m", "fitscope.bench", "--smoke", "--json", str(out)],
        cwd=REPO,
        env=venv_env(FITSCOPE_PROGRESS="0"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = json.loads(out.read_text())
    for key in (
        "tiny_lightning_over_plain",
        "large_efficiency",
        "bf16_over_fp32_speed",
        "tracking_overhead",
        "checkpoint_overhead",
        "gpu_path_on_cpu",
        "load_points_per_s",
        "study_minutes",
        "study_floor_minutes",
        "study_floor_ratio",
        "ingest_s_per_11M_rows",
    ):
        assert key in figures, key
    assert figures["smoke"] is True and figures["study_minutes"] > 0
    # The floor is what the runs' matmuls take at the measured peak: never above the wall.
    assert 0 < figures["study_floor_minutes"] < figures["study_minutes"]
    assert figures["study_floor_ratio"] > 1
    assert set(figures["startup_s"]) == {"fetch", "split", "train", "evaluate", "report"}
    after = (
        (REPO / "reports" / "bench.json").read_bytes()
        if (REPO / "reports" / "bench.json").exists()
        else None
    )
    assert after == before  # the smoke run wrote only where it was told
