"""Figures for the reports: a headless pyplot and crash-safe PNG writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fitscope.core.fileio import atomic_path
from fitscope.results.bands import Band, epoch_band


def run_figure(hist: list[dict[str, float]], title: str, selected: int, path: Path) -> Path:
    """One run's learning curves: train vs validation loss and accuracy, the selected epoch
    marked (logged with the run, drawn the way the report draws a study)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, name in zip(axes, ("loss", "acc"), ("loss", "accuracy"), strict=True):
        curve_pair(ax, hist, key, "C0", "")
        ax.axvline(selected + 1, color="grey", lw=0.8, ls=":", label="selected epoch")
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"{title}: train (dashed) vs validation (solid)", fontsize=10)
    save_png(fig, path)
    return path


def curve_pair(ax, hist: list[dict[str, float]], key: str, color: str, label: str) -> None:
    """Train (dashed) and validation (solid) of one quantity, as every figure draws them."""
    epochs = [h["epoch"] + 1 for h in hist]
    ax.plot(epochs, [h[f"train/{key}"] for h in hist], "--", color=color, label=f"{label}train")
    ax.plot(epochs, [h[f"val/{key}"] for h in hist], "-", color=color, label=f"{label}val")


def band_pair(
    ax, histories: list[list[dict[str, float]]], key: str, color: str, label: str
) -> None:
    """``curve_pair`` over seeds: the mean train (dashed) and validation (solid) curves with
    a ± std band each; one seed is drawn as ``curve_pair`` draws it."""
    if len(histories) == 1:
        curve_pair(ax, histories[0], key, color, label)
        return
    for split, style in (("train", "--"), ("val", "-")):
        draw_band(
            ax, epoch_band(histories, f"{split}/{key}"), style, f"{label}{split}", color=color
        )


def draw_band(ax, band: Band, style: str, label: str | None, **kwargs: Any) -> None:
    """``band``'s mean as a line (``style``, ``label``, matplotlib ``kwargs``) and, where
    the seeds differ, a ± std band around it in the line's colour."""
    line = ax.plot(band.x, band.mean, style, label=label, **kwargs)[0]
    if any(band.std):
        ax.fill_between(band.x, band.low, band.high, color=line.get_color(), alpha=0.15, lw=0)


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> None:
    """Lay out ``fig``, write it to ``path`` as PNG atomically, and close it."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    pyplot().close(fig)
