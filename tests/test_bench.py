"""make bench: every code path runs (its smoke mode), and its figures are merged into
reports/bench.json, never replace it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, venv_env

from fitscope.bench.record import record


def test_record_merges_into_an_existing_file(tmp_path):
    path = tmp_path / "reports" / "bench.json"
    record({"ingest_s_per_11M_rows": 40.0, "tracking_overhead": 0.5}, path)  # another bench
    merged = record({"tracking_overhead": 0.01, "large_gflops": 70.0}, path)
    expected = {"ingest_s_per_11M_rows": 40.0, "tracking_overhead": 0.01, "large_gflops": 70.0}
    assert merged == expected
    assert json.loads(path.read_text()) == expected


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
