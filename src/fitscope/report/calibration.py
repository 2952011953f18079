"""The report's "Calibration" section: per dataset, the reliability diagram of every
variant on the test split (and, for a binary task, its ROC and precision-recall curves),
with each variant's expected calibration error; the seed-0 curves as CSV for
`dvc plots show` (reports/calibration/, reports/roc/)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from fitscope.core.fileio import read_float_csv, write_csv
from fitscope.results.figures import pyplot, save_png

SENTENCE = (
    "Calibration on the test split (seed 0): a calibrated model's points lie on the "
    "diagonal of the reliability diagram; below it the model is over-confident, as over-fit "
    "networks tend to be, which accuracy and AUROC do not show. ECE is the mean gap between "
    "confidence and accuracy over 15 bins, weighted by their counts (torchmetrics). For a "
    "binary task: ROC and precision-recall curves beside it."
)
KINDS = ("calibration", "roc", "pr")
DVC_PLOTS = ("calibration", "roc")  # reports/<kind>/<variant>.csv (dvc.yaml plots)


def _seed0_curves(result: Any) -> dict[str, list[dict[str, float]]]:
    run_dir = result.run_dirs[0]
    files = {kind: run_dir / f"{kind}.csv" for kind in KINDS}
    return {kind: read_float_csv(path) for kind, path in files.items() if path.is_file()}


def _figure(curves: dict[str, dict[str, list]], dataset: str, path: Path) -> Path:
    plt = pyplot()
    binary = any("roc" in c for c in curves.values())
    fig, axes = plt.subplots(1, 3 if binary else 1, figsize=(15 if binary else 5.5, 4.8))
    axes = list(axes) if binary else [axes]
    axes[0].plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--", label="calibrated")
    for name, c in curves.items():
        bins = c["calibration"]
        axes[0].plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o-", ms=3)
        axes[0].lines[-1].set_label(name)
        if binary and "roc" in c:
            axes[1].plot([p["fpr"] for p in c["roc"]], [p["tpr"] for p in c["roc"]], lw=1)
            axes[2].plot([p["recall"] for p in c["pr"]], [p["precision"] for p in c["pr"]], lw=1)
    axes[0].set(xlabel="confidence", ylabel="accuracy", title=f"{dataset}: reliability")
    axes[0].legend(fontsize=7)
    if binary:
        axes[1].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        axes[2].set(xlabel="recall", ylabel="precision", title="precision-recall")
    for ax in axes:
        ax.grid(alpha=0.3)
    save_png(fig, path)
    return path


def calibration_sections(results: list[Any], out: Path) -> dict[str, Any]:
    """Per dataset: its figure (None without curves: runs of an older fitscope) and a row
    per variant (ECE over seeds, the seed-0 curve files written for `dvc plots`)."""
    sections: dict[str, Any] = {}
    for kind in DVC_PLOTS:  # DVC outputs: there even when nothing fills them
        (out / kind).mkdir(parents=True, exist_ok=True)
    for dataset in dict.fromkeys(r.dataset for r in results):
        group = [r for r in results if r.dataset == dataset]
        curves = {r.name: c for r in group if "calibration" in (c := _seed0_curves(r))}
        for name, c in curves.items():
            for kind in DVC_PLOTS:
                if kind in c:
                    rows = c[kind]
                    lines = [list(rows[0]), *(list(row.values()) for row in rows)]
                    write_csv(out / kind / f"{name}.csv", lines)
        figure = (
            _figure(curves, dataset, out / "figures" / f"calibration_{dataset}.png")
            if curves
            else None
        )
        rows = []
        for r in group:
            ece = [run["test_ece"] for run in r.runs if "test_ece" in run]
            rows.append(
                {"variant": r.name, "ECE": f"{statistics.fmean(ece):.4f}" if ece else "n/a"}
            )
        sections[dataset] = {"figure": figure, "rows": rows}
    return sections
