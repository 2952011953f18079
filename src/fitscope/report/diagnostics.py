"""The report's "Learning curve: training-set size" and "Validation curves" sections, from
the runs of stage diagnose (params.yaml diagnostics) and the variants' own runs: a figure
and a table per diagnostic, one sentence per variant, CSVs for `dvc plots`
(reports/diagnostics/<study>/<variant>.csv)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fitscope.core.fileio import read_float_csv, write_csv
from fitscope.pipeline.diagnostics import RUNS_DIR, SIZE_AXIS, Diagnostic, diagnostics
from fitscope.report.render import Block, Section, mean_cell
from fitscope.results.bands import band_over, mean_std
from fitscope.results.diagnostics import Point, best_point, curve_reading, size_reading, turns
from fitscope.results.figures import draw_band, pyplot, save_png
from fitscope.results.seeds import run_setting, seed_dirs, seed_key
from fitscope.results.verdict import dataset_floor, seed_count, seed_train_loss, verdict

SIZE_TITLE = "Learning curve: training-set size"
SIZE_SENTENCE = (
    "Best validation loss (solid) and the selected model's training loss (dashed, eval "
    "mode) against the number of training rows, mean and ± std band over seeds: a gap that "
    "closes as rows are added means more data helps; both losses high and flat means the "
    "model is capacity-bound."
)
CURVES_TITLE = "Validation curves"
CURVES_SENTENCE = (
    "Best validation loss (solid) and the selected model's training loss (dashed) against "
    "model width and regularization strength, mean and ± std band over seeds: a star marks "
    "the best value, a ring each value whose runs overfit (most seeds), a dotted line where "
    "the curve turns to or from overfitting."
)
AXES = {  # how a figure draws an axis: its label and scale
    "data.train_size": ("training rows", "log"),
    "model.width": ("units per hidden layer", "log"),
    "regularization.l2": ("L2 strength (0: none)", "symlog"),
    "regularization.dropout": ("dropout rate", "linear"),
}
DVC_PLOTS_DIR = "diagnostics"  # reports/diagnostics: a report output and a dvc plot


@dataclass
class _Runs:
    value: float
    runs: list[dict[str, Any]]  # metrics.json of each seed
    histories: list[list[dict[str, float]]]
    seeds: list[str]  # each run's seed (its directory's name)
    diagnostic: bool = True  # trained by stage diagnose (else: a variant's own runs)


def _read(value: float, dirs: list[Path]) -> _Runs:
    return _Runs(
        value,
        [json.loads((d / "metrics.json").read_text()) for d in dirs],
        [read_float_csv(d / "history.csv") for d in dirs],
        [d.name for d in dirs],
    )


def _own_runs(value: float, result: Any) -> _Runs:
    seeds = [d.name for d in result.run_dirs]
    return _Runs(value, result.runs, result.histories, seeds, diagnostic=False)


def _own_value(result: Any, axis: str) -> float | None:
    """The variant's own value of ``axis``, from its run's composed config (Hydra's
    .hydra/config.yaml); ``data.train_size: null`` is every row it trained on."""
    value = run_setting(result.run_dirs[0], axis)
    if value is None and axis == SIZE_AXIS:
        value = result.runs[0].get("train_rows")
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _lines(diag: Diagnostic, by_name: dict[str, Any], runs_root: Path) -> dict[str, list[_Runs]]:
    """Per variant of ``diag``: its runs at each value, own and origin included, by value."""
    lines = {}
    for variant in diag.variants:
        own = by_name[variant]
        points = [_read(v, seed_dirs(runs_root / diag.run_name(variant, v))) for v in diag.values]
        if (value := _own_value(own, diag.axis)) is not None and value not in diag.values:
            points.append(_own_runs(value, own))
        if diag.origin and 0 not in diag.values:
            origin = by_name[diag.origin]
            points.append(_own_runs(0, origin))
        lines[variant] = sorted(points, key=lambda p: p.value)
    return lines


def _train_loss(run: dict[str, Any]) -> float:
    """The selected model's training loss, in eval mode (an older record: as logged)."""
    loss = seed_train_loss(run)
    return run["best_train_loss"] if loss is None else loss


def _points(lines: dict[str, list[_Runs]], floor: float) -> dict[str, list[Point]]:
    return {
        variant: [
            Point(
                r.value,
                [run["best_val_loss"] for run in r.runs],
                [_train_loss(run) for run in r.runs],
                [
                    verdict(h, floor, seed_train_loss(run), run.get("constant_val_loss"))
                    for h, run in zip(r.histories, r.runs, strict=True)
                ],
                r.seeds,
            )
            for r in runs
        ]
        for variant, runs in lines.items()
    }


def _figure(diag: Diagnostic, points: dict[str, list[Point]], path: Path) -> Path:
    plt = pyplot()
    label, scale = AXES.get(diag.axis, (diag.axis, "linear"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (variant, line) in enumerate(points.items()):
        x = [p.value for p in line]
        for values, style, split in (
            ([p.val for p in line], "-", "val"),
            ([p.train for p in line], "--", "train"),
        ):
            band = band_over(x, values)
            draw_band(ax, band, style, f"{variant} {split}", marker="o", ms=3, color=f"C{i}")
        best = best_point(line)
        ax.plot([best.value], [best.val_mean], "*", ms=14, color=f"C{i}", mec="black")
        over = [p for p in line if p.overfitting]
        ax.plot([p.value for p in over], [p.val_mean for p in over], "o", ms=11, mfc="none",
                mec="red", label="overfitting" if i == 0 and over else None)  # fmt: skip
        for a, b in turns(line):  # halfway as the axis draws it: geometric on a log scale
            middle = math.sqrt(a * b) if scale != "linear" and a > 0 else (a + b) / 2
            ax.axvline(middle, color=f"C{i}", lw=0.8, ls=":")
    if scale == "symlog":
        positive = [p.value for line in points.values() for p in line if p.value > 0]
        ax.set_xscale("symlog", linthresh=min(positive, default=1.0))
    else:
        ax.set_xscale(scale)
    ax.set(xlabel=label, ylabel="loss", title=f"{diag.study}: validation (solid), train (dashed)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
    return path


def _write_plot_files(diag: Diagnostic, points: dict[str, list[Point]], out: Path) -> None:
    """``reports/diagnostics/<study>/<variant>.csv``: a row per value, the means and stds
    and every seed's values (columns ``val_loss_seed<seed>``; blank where a value has no
    run of that seed)."""
    for variant, line in points.items():
        seeds = sorted({s for p in line for s in p.seeds}, key=seed_key)
        head = ["value", "val_loss", "train_loss", "val_loss_std", "train_loss_std"]
        head += [f"{k}_seed{s}" for s in seeds for k in ("val_loss", "train_loss")]
        rows = []
        for p in line:
            (val, val_std), (train, train_std) = mean_std(p.val), mean_std(p.train)
            by_seed = {s: (v, t) for s, v, t in zip(p.seeds, p.val, p.train, strict=True)}
            per_seed = [x for s in seeds for x in by_seed.get(s, ("", ""))]
            rows.append([p.value, val, train, val_std, train_std, *per_seed])
        write_csv(out / DVC_PLOTS_DIR / diag.study / f"{variant}.csv", [head, *rows])


def _rows(points: dict[str, list[Point]]) -> list[dict[str, str]]:
    return [
        {
            "variant": variant,
            "value": f"{p.value:g}",
            "best val loss": mean_cell(p.val),
            "train loss": mean_cell(p.train),
            "gap": f"{p.gap:.4f}",
            "verdict": seed_count(p.verdicts),
        }
        for variant, line in points.items()
        for p in line
    ]


@dataclass
class DiagnosticReport:
    sections: list[Section]  # the two sections (no blocks: params.yaml has no diagnostics)
    blocks: dict[str, Block]  # each diagnostic's block (table, figure, readings), by study
    verdicts: dict[str, dict[str, str]]  # each diagnostic's MLflow runs' verdicts, by study


def _verdicts(lines: dict[str, list[_Runs]], points: dict[str, list[Point]]) -> dict[str, str]:
    """The verdict of each MLflow run the diagnostic trained, by run id."""
    found = {}
    for variant, runs in lines.items():
        for r, p in zip(runs, points[variant], strict=True):
            for run, run_verdict in zip(r.runs, p.verdicts, strict=True):
                if r.diagnostic and run.get("mlflow_run_id"):
                    found[run["mlflow_run_id"]] = run_verdict
    return found


def diagnostic_report(
    params: dict[str, Any], results: list[Any], runs_root: Path, out: Path
) -> DiagnosticReport:
    """The sections, figures and plot files of params.yaml's diagnostics."""
    by_name = {r.name: r for r in results}
    size = Section(SIZE_TITLE, SIZE_SENTENCE)
    curves = Section(CURVES_TITLE, CURVES_SENTENCE)
    blocks, verdicts = {}, {}
    (out / DVC_PLOTS_DIR).mkdir(parents=True, exist_ok=True)  # a DVC output: always there
    for diag in diagnostics(params):
        lines = _lines(diag, by_name, runs_root / RUNS_DIR.name)
        points = _points(lines, dataset_floor(results, diag.dataset))
        verdicts[diag.study] = _verdicts(lines, points)
        figure = _figure(diag, points, out / "figures" / f"{diag.study}.png")
        _write_plot_files(diag, points, out)
        sized = diag.axis == SIZE_AXIS
        readings = [
            f"**{v}**: {size_reading(line) if sized else curve_reading(line, diag.axis)}"
            for v, line in points.items()
        ]
        blocks[diag.study] = Block(diag.study, _rows(points), figure, readings)
        (size if sized else curves).blocks.append(blocks[diag.study])
    return DiagnosticReport([size, curves], blocks, verdicts)
