"""Draw docs/architecture.png from the layer contract in pyproject.toml (the same rule
`make lint` checks), so the picture cannot drift from the code.

    python scripts/draw_architecture.py
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyBboxPatch

REPO = Path(__file__).resolve().parents[1]
COLORS = ["#fde2e4", "#e2ece9", "#dfe7fd", "#fff1e6", "#e9f5db", "#f0efeb"]


def layers() -> list[list[str]]:
    """The layers, top first, each a list of independent packages (names without fitscope.)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["type"] == "layers")
    return [
        [m.strip().removeprefix("fitscope.") for m in layer.split("|")]
        for layer in contract["layers"]
    ]


def docstring(package: str) -> str:
    """The first paragraph of the package's (or module's) docstring."""
    base = REPO / "src" / "fitscope" / package
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    text = path.read_text().split('"""')[1].strip()
    return text.split("\n\n")[0].replace("\n", " ").replace("``", "").replace("`", "")


def draw(out: Path) -> None:
    rows = layers()
    fig, ax = plt.subplots(figsize=(13, 1.45 * len(rows) + 0.6))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 10 * len(rows) + 4)
    ax.axis("off")
    for depth, row in enumerate(rows):
        y = 10 * (len(rows) - depth - 1) + 2
        width = 98 / len(row)
        for i, package in enumerate(row):
            x = 1 + i * width
            box = FancyBboxPatch(
                (x + 0.5, y),
                width - 1,
                7.5,
                boxstyle="round,pad=0.3",
                facecolor=COLORS[depth % len(COLORS)],
                edgecolor="#555",
            )
            ax.add_patch(box)
            ax.text(
                x + width / 2,
                y + 6.0,
                package + ("/" if (REPO / "src" / "fitscope" / package).is_dir() else ".py"),
                ha="center",
                va="center",
                fontsize=12,
                weight="bold",
            )
            words, lines, line = docstring(package).split(), [], ""
            chars = max(int(width * 1.6), 24)
            for word in words:
                if len(line) + len(word) + 1 > chars:
                    lines.append(line)
                    line = word
                else:
                    line = f"{line} {word}".strip()
            lines.append(line)
            ax.text(
                x + width / 2,
                y + 2.7,
                "\n".join(lines[:5]),
                ha="center",
                va="center",
                fontsize=6.5,
                color="#333",
            )
    ax.annotate("", xy=(99.4, 2), xytext=(99.4, 10 * len(rows)), arrowprops={"arrowstyle": "->"})
    ax.text(99.6, 5 * len(rows), "imports", rotation=-90, va="center", fontsize=9)
    ax.set_title(
        "fitscope: each layer imports only the layers below it "
        "(siblings side by side import nothing of each other)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    draw(REPO / "docs" / "architecture.png")
    print(f"wrote {REPO / 'docs' / 'architecture.png'}")
