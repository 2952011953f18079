"""The report's "Calibration" section: per dataset, the reliability diagram of every
variant on the test split (and, for a binary task, its ROC and precision-recall curves),
with each variant's expected calibration error; the seed-0 curves as CSV for
`dvc plots show` (reports/calibration/, reports/roc/)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fitscope.core.fileio import read_float_csv, write_csv
from fitscope.report.render import Block, Section, mean_cell
from fitscope.results.bands import Band, band_over, mean_std
from fitscope.results.figures import draw_band, pyplot, save_png

SENTENCE = (
    "Calibration on the test split (with several seeds: the mean and a ± std band): a "
    "calibrated model's points lie on the diagonal of the reliability diagram; below it "
    "the model is over-confident, as over-fit "
    "networks tend to be, which accuracy and AUROC do not show. ECE is the mean gap between "
    "confidence and accuracy over 15 bins, weighted by their counts (torchmetrics). For a "
    "binary task: ROC and precision-recall curves beside it."
)
KINDS = ("calibration", "roc", "pr")
DVC_PLOTS = ("calibration", "roc")  # reports/<kind>/<variant>.csv (dvc.yaml plots)


def _seed_curves(result: Any) -> dict[Path, dict[str, list[dict[str, float]]]]:
    """Each seed's curve files by run directory (in seed order); a seed without them (an
    older fitscope's run) is left out."""
    found = {}
    for run_dir in result.run_dirs:
        files = {kind: run_dir / f"{kind}.csv" for kind in KINDS}
        curves = {kind: read_float_csv(path) for kind, path in files.items() if path.is_file()}
        if "calibration" in curves:
            found[run_dir] = curves
    return found


def _on_grid(seeds: list[list[dict[str, float]]], x: str, y: str) -> Band:
    """Curves of each seed (ROC, PR) interpolated on 101 values of ``x``: their mean ±
    std (one seed: its curve on the grid)."""
    import numpy as np

    grid = np.linspace(0.0, 1.0, 101)
    ys = []
    for rows in seeds:
        # In the curve's own order along x (torchmetrics gives recall falling), then a
        # stable sort: a vertical step keeps its direction where x repeats.
        ordered = rows[::-1] if rows and rows[0][x] > rows[-1][x] else rows
        points = sorted(((p[x], p[y]) for p in ordered), key=lambda p: p[0])
        ys.append(np.interp(grid, [p[0] for p in points], [p[1] for p in points]))
    stacked = np.vstack(ys)
    std = stacked.std(axis=0, ddof=1) if len(ys) > 1 else np.zeros_like(grid)
    return Band(list(grid), list(stacked.mean(axis=0)), list(std))


def _reliability(seeds: list[list[dict[str, float]]]) -> tuple[Band, list[float]]:
    """The reliability diagram over seeds: per bin (torchmetrics' fixed bins), the mean
    confidence and the mean ± std accuracy of the seeds with a prediction in it."""
    by_bin: dict[float, list[dict[str, float]]] = {}
    for rows in seeds:
        for row in rows:
            by_bin.setdefault(row["bin_low"], []).append(row)
    bins = [by_bin[b] for b in sorted(by_bin)]
    confidence = [mean_std([row["confidence"] for row in rows])[0] for rows in bins]
    return band_over(confidence, [[row["accuracy"] for row in rows] for rows in bins]), confidence


def _figure(curves: dict[str, list[dict[str, list]]], dataset: str, path: Path) -> Path:
    plt = pyplot()
    binary = any("roc" in seeds[0] for seeds in curves.values())
    fig, axes = plt.subplots(1, 3 if binary else 1, figsize=(15 if binary else 5.5, 4.8))
    axes = list(axes) if binary else [axes]
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for name, seeds in curves.items():
        draw_band(axes[0], _reliability([c["calibration"] for c in seeds])[0], "o-", name, ms=3)
        if binary and all("roc" in c and "pr" in c for c in seeds):
            roc = _on_grid([c["roc"] for c in seeds], "fpr", "tpr")
            draw_band(axes[1], roc, "-", name, lw=1)
            pr = _on_grid([c["pr"] for c in seeds], "recall", "precision")
            draw_band(axes[2], pr, "-", name, lw=1)
    seeds = max(len(s) for s in curves.values())
    band = f", mean ± std of {seeds} seeds" if seeds > 1 else ""
    axes[0].set(xlabel="confidence", ylabel="accuracy", title=f"{dataset}: reliability{band}")
    axes[0].legend(fontsize=7)
    if binary:
        axes[1].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        axes[2].set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in axes:
        ax.grid(alpha=0.3)
    save_png(fig, path)
    return path


def _write_plot_files(name: str, seeds: dict[Path, dict[str, list]], out: Path) -> None:
    """``reports/<kind>/<variant>.csv``: the first seed's curve; with several seeds also
    ``reports/<kind>/seeds/<variant>/<seed>.csv`` for each (the dvc plots draw them all)."""
    for kind in DVC_PLOTS:
        named = {out / kind / f"{name}.csv": next(iter(seeds.values())).get(kind)}
        if len(seeds) > 1:
            named |= {
                out / kind / "seeds" / name / f"{d.name}.csv": c.get(kind) for d, c in seeds.items()
            }
        for path, rows in named.items():
            if rows:
                write_csv(path, [list(rows[0]), *(list(row.values()) for row in rows)])


def calibration_section(results: list[Any], out: Path) -> Section:
    """The "Calibration" section: per dataset its figure (none without curves: runs of an
    older fitscope) and a row per variant (ECE over seeds); the curve files are written
    for `dvc plots`."""
    blocks = []
    for kind in DVC_PLOTS:  # DVC outputs: there even when nothing fills them
        (out / kind).mkdir(parents=True, exist_ok=True)
    for dataset in dict.fromkeys(r.dataset for r in results):
        group = [r for r in results if r.dataset == dataset]
        curves = {r.name: c for r in group if (c := _seed_curves(r))}
        for name, seeds in curves.items():
            _write_plot_files(name, seeds, out)
        figure = (
            _figure(
                {name: list(seeds.values()) for name, seeds in curves.items()},
                dataset,
                out / "figures" / f"calibration_{dataset}.png",
            )
            if curves
            else None
        )
        rows = []
        for r in group:
            ece = [run["test_ece"] for run in r.runs if "test_ece" in run]
            rows.append({"variant": r.name, "ECE": mean_cell(ece) if ece else "n/a"})
        blocks.append(Block(dataset.upper(), rows, figure))
    return Section("Calibration", SENTENCE, blocks)
