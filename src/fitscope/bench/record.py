"""reports/bench.json: figures merged in atomically, and the table printed beside the goals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fitscope.core.fileio import write_json

BENCH_JSON = Path("reports/bench.json")


def record(figures: dict[str, Any], path: Path = BENCH_JSON) -> dict[str, Any]:
    """Merge ``figures`` into the JSON file at ``path`` (other benchmarks add their own keys)
    and return the whole content. Written atomically."""

    content = json.loads(path.read_text()) if path.is_file() else {}
    content.update(figures)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, content)
    return content


GOALS = {
    "large_lightning_over_plain": "<= 1.05",
    "large_efficiency": ">= 0.8",
    "tracking_overhead": "<= 0.02",
    "checkpoint_overhead": "<= 0.01",
    "study_floor_ratio": "<= 1.5",
    "study_val_loss_max_delta": "<= 0.01",
    "study_verdicts_changed": "0",
}


def print_table(figures: dict[str, Any]) -> None:
    width = max(map(len, figures))
    for key, value in figures.items():
        if isinstance(value, dict) and key == "study_fidelity":  # variant: [then, now] each
            print(f"  {key}: published / this run")
            for variant, cells in value.items():
                print(f"    {variant:<18}" + "  ".join(" / ".join(pair) for pair in cells.values()))
            continue
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        goal = f"  (goal {GOALS[key]})" if key in GOALS else ""
        print(f"  {key:<{width}}  {shown}{goal}")
