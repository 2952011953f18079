"""What a diagnostic's points say: the reading of a learning curve over training-set size,
and the best point and the turns to overfitting of a validation curve."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from fitscope.results.bands import mean_std

STILL_FALLING = 0.01  # the last step of a learning curve lowered the val loss by > 1%
CLOSED = 0.5  # the train-val gap at the largest size is at most half that at the smallest


@dataclass
class Point:
    """One value of a diagnostic's axis for one variant, over seeds."""

    value: float
    val: list[float]  # best validation loss of each seed
    train: list[float]  # training loss of each seed's selected model (eval mode)
    verdicts: list[str]
    seeds: list[str] = field(default_factory=list)  # each value's seed, in order

    @property
    def val_mean(self) -> float:
        return mean_std(self.val)[0]

    @property
    def gap(self) -> float:
        return self.val_mean - mean_std(self.train)[0]

    @property
    def overfitting(self) -> bool:
        """Most of its seeds were judged overfitting."""
        return 2 * self.verdicts.count("overfitting") > len(self.verdicts)


def size_reading(points: list[Point]) -> str:
    """One sentence on a learning curve over training-set size (points in size order)."""
    if len(points) < 2:
        return "one size only: no curve to read"
    small, before, last = points[0], points[-2], points[-1]
    falling = last.val_mean < (1 - STILL_FALLING) * before.val_mean
    closing = last.gap <= CLOSED * small.gap
    gaps = f"the train-validation gap goes from {small.gap:.3f} to {last.gap:.3f}"
    if falling and closing:
        return f"more data helps: the validation loss still falls at the largest size and {gaps}"
    if falling:
        return f"more data still lowers the validation loss, but {gaps}: variance remains"
    if closing:
        return (
            f"capacity-bound: the validation loss has flattened and {gaps}; more data alone "
            "will not help, more capacity may"
        )
    return (
        f"the validation loss has flattened while {gaps}: more data stopped helping at this "
        "size, regularization may close the gap"
    )


def best_point(points: list[Point]) -> Point:
    """The point with the lowest mean best validation loss."""
    return min(points, key=lambda p: p.val_mean)


def turns(points: list[Point]) -> list[tuple[float, float]]:
    """The neighbouring values (in axis order) between which the curve turns to or from
    overfitting: where the majority verdict changes."""
    return [
        (a.value, b.value) for a, b in itertools.pairwise(points) if a.overfitting != b.overfitting
    ]


def curve_reading(points: list[Point], axis: str) -> str:
    """One sentence on a validation curve: its best value and where it overfits."""
    best = best_point(points)
    over = [p.value for p in points if p.overfitting]
    where = (
        f"overfitting at {axis} = {', '.join(f'{v:g}' for v in over)}"
        if over
        else "no value overfits"
    )
    return f"best at {axis} = {best.value:g} (validation loss {best.val_mean:.4f}); {where}"
