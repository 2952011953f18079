"""The report's "Early stopping" section: per variant, the test loss of the selected epoch
against the last one trained, and the epoch each patience would have selected (replayed
from the logged history, fitscope.results.early_stopping)."""

from __future__ import annotations

import statistics
from typing import Any

from fitscope.report.render import Block, Section
from fitscope.results.early_stopping import Replay, replays
from fitscope.results.seeds import run_setting

SENTENCE = (
    "What early stopping bought: the test loss of the restored (selected) epoch against the "
    "weights of the last epoch trained, and, replayed from the first seed's history with its "
    "own early-stopping settings (monitor, mode, min_delta), the epoch that another patience "
    "would have selected, the monitored value there and the epochs it would have saved "
    "(>= where the run ended before that patience ran out)."
)


def _mean(values: list[float]) -> str:
    return f"{statistics.fmean(values):.4f}" if values else "n/a"


def _replay_cell(replay: Replay) -> str:
    if replay.selected_epoch is None:
        return "n/a (no finite value)"
    saved = "run ended first" if replay.stopped_epoch is None else f"-{replay.epochs_saved} ep"
    return f"{replay.selected_epoch} ({replay.value:.4f}, {saved})"


def early_stopping_section(results: list[Any]) -> Section:
    """The "Early stopping" section: a table per dataset (``early_stopping_rows``)."""
    tables = early_stopping_rows(results)
    return Section(
        "Early stopping", SENTENCE, [Block(d.upper(), rows) for d, rows in tables.items()]
    )


def _replays(result: Any) -> list[Replay]:
    """Seed 0's replay, with the monitor, mode and min_delta its run's early stopping used
    (its recorded config; a record without one: val/loss, min, 0)."""
    settings = run_setting(result.run_dirs[0], "callbacks.early_stopping")
    settings = settings if isinstance(settings, dict) else {}
    monitor = settings.get("monitor") or "val/loss"
    mode = settings.get("mode") or "min"
    return replays(result.histories[0], monitor, mode, settings.get("min_delta") or 0.0)


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
        row |= {f"patience {x.patience}": _replay_cell(x) for x in _replays(r)}
        tables.setdefault(r.dataset, []).append(row)
    return tables
