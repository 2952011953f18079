"""Figures for the reports: a headless pyplot and crash-safe PNG writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fitscope.fileio import atomic_path


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
