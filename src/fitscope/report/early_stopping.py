"""The report's "Early stopping" section: per variant, the test loss of the selected epoch
against the last one trained, and the epoch each patience would have selected (replayed
from the logged history, fitscope.results.early_stopping)."""

from __future__ import annotations

import statistics
from typing import Any

from fitscope.results.early_stopping import Replay, replays

SENTENCE = (
    "What early stopping bought: the test loss of the restored (selected) epoch against the "
    "weights of the last epoch trained, and, replayed from each run's validation loss, the "
    "epoch that another patience would have selected, its validation loss and the epochs it "
    "would have saved (>= where the run ended before that patience ran out)."
)


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f}" if values else "n/a"


def _replay_cell(replay: Replay) -> str:
    if replay.selected_epoch is None:
        return "n/a (no finite value)"
    saved = "run ended first" if replay.stopped_epoch is None else f"-{replay.epochs_saved} ep"
    return f"{replay.selected_epoch} ({replay.value:.4f}, {saved})"


def early_stopping_rows(results: list[Any]) -> dict[str, list[dict[str, str]]]:
    """One row per variant, grouped by dataset (seed 0's replay; test losses over seeds)."""
    tables: dict[str, list[dict[str, str]]] = {}
    for r in results:
        selected = [run["test_loss"] for run in r.runs if "test_loss" in run]
        last = [run["last_epoch_test_loss"] for run in r.runs if "last_epoch_test_loss" in run]
        row = {
            "variant": r.name,
            "selected epoch": str(int(r.runs[0]["best_epoch"])),
            "last epoch": str(int(r.runs[0]["stopped_epoch"])),
            "test loss (selected)": _mean(selected),
            "test loss (last)": _mean(last),
        }
        row |= {f"patience {x.patience}": _replay_cell(x) for x in replays(r.histories[0])}
        tables.setdefault(r.dataset, []).append(row)
    return tables
