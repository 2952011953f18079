"""The answer at the end of a study: the comparison table, the champions, where to look.

Printed by ``fitscope report`` (the DVC report stage, also ``python -m fitscope.report``)
and by ``fitscope summary`` (what ``make demo`` and ``make study`` end with, also when
DVC skipped an unchanged report stage). Tables are drawn by rich; the numbers are the
report's own (``study.comparison_rows``), read from runs/ and metrics/*.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fitscope.report.record import champion, registry_alias
from fitscope.report.study import comparison_rows, load_results
from fitscope.tracking.store import where_to_look

# The terminal shows these columns of the report's table (the report has them all).
COLUMNS = (
    "variant",
    "params",
    "val loss",
    "test loss",
    "test acc",
    "test AUROC",
    "selected epoch",
    "stopped epoch",
    "verdict",
)
PIPE_WIDTH = 160  # a pipe or file has no width: wide enough that no cell wraps


def console() -> Console:
    """A console on stdout; plain text (no colours, fixed width) when not a terminal."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=PIPE_WIDTH, no_color=True)


def print_summary(
    params: dict[str, Any],
    runs_root: str | Path = "runs",
    metrics_dir: str | Path = "metrics",
    out: str | Path = "reports",
    out_console: Console | None = None,
) -> None:
    """Print each dataset's comparison table, its champion, and where the results are."""
    con = out_console or console()
    results = load_results(params, Path(runs_root), Path(metrics_dir))
    profile = (params.get("study") or {}).get("profile", "classic")
    for dataset in dict.fromkeys(r.dataset for r in results):
        rows = comparison_rows(results, dataset)
        table = Table(title=f"{dataset.upper()} ({profile} profile)", title_justify="left")
        columns = [c for c in COLUMNS if c in rows[0]]
        for column in columns:
            table.add_column(
                column, justify="left" if column in ("variant", "verdict") else "right"
            )
        for row in rows:
            table.add_row(*(row[c] for c in columns))
        con.print(table)
        best = champion(results, dataset)
        mean, _ = best.stat("best_val_loss")
        registered = any(run.get("mlflow_model_uri") for run in best.runs)
        uri = f"models:/fitscope-{dataset}@{registry_alias(profile)}"
        alias = f", registered as {uri}" if registered else ""
        con.print(f"champion {dataset}: {best.name} (best val loss {mean:.4f}{alias})")
    out = Path(out)
    con.print(f"report:  {out / 'study.md'}  (self-contained: {out / 'study.html'})")
    con.print(f"figures: {out / 'figures'}/*.png, curves for `dvc plots show` in {out / 'curves'}")
    con.print(f"MLflow:  {where_to_look()} (Model training view)")
