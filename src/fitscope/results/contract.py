"""The metrics.json contract: the key names a training run writes and the evaluate stage,
the report and the summary read; and the report's comparison.csv, which the benchmark
reads back.
"""

from __future__ import annotations

import csv
from pathlib import Path

from fitscope.core.fileio import write_csv


def metrics_file_key(key: str) -> str:
    """The metrics.json name of an MLflow summary key: ``fit/best_epoch`` -> ``best_epoch``,
    ``model/n_params`` -> ``n_params``, ``data/train_rows`` -> ``train_rows``,
    ``best/val/loss`` -> ``best_val_loss``."""
    group, _, rest = key.partition("/")
    return rest if group in ("fit", "model", "data") else key.replace("/", "_")


# The per-seed keys of a run's metrics.json that this stage averages (train._fit writes them).
SCORE_KEYS = (
    "test_loss",
    "test_acc",
    "test_auroc",
    "train_eval_loss",
    "test_ece",  # expected calibration error (model.metrics.calibration_error)
    "last_epoch_test_loss",  # the last trained epoch's weights: what early stopping bought
)


def write_comparison_csv(tables: dict[str, list[dict[str, str]]], path: Path) -> None:
    """The report's comparison table, ``tables`` of rows by dataset, as one CSV: a header
    row before each dataset's rows (their columns differ)."""
    lines: list[list[str]] = []
    for dataset, rows in tables.items():
        lines.append(["dataset", *rows[0]])
        lines += ([dataset, *row.values()] for row in rows)
    write_csv(path, lines)


def read_comparison_csv(path: Path) -> dict[str, dict[str, str]]:
    """The rows of a :func:`write_comparison_csv` file by variant, each under its own
    dataset's header."""
    rows: dict[str, dict[str, str]] = {}
    header: list[str] = []
    for line in csv.reader(path.read_text().splitlines()):
        if line and line[0] == "dataset":
            header = line
        elif line and header:
            row = dict(zip(header, line, strict=True))
            rows[row["variant"]] = row
    return rows
