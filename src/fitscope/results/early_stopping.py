"""What early stopping bought: the epoch another patience would have selected, replayed
from a run's logged history with Lightning's EarlyStopping rule (stop once ``patience``
epochs in a row did not improve on the best by more than ``min_delta``)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PATIENCES = (10, 20, 50, 100, 200)


@dataclass(frozen=True)
class Replay:
    patience: int
    selected_epoch: int | None  # the best epoch up to where it stops (None: none finite)
    value: float  # the monitored value there (nan: none finite)
    stopped_epoch: int | None  # None: the history ends before this patience runs out
    epochs_saved: int  # epochs the run trained after where this patience stops

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def patience_replay(
    values: list[float], patience: int, mode: str = "min", min_delta: float = 0.0
) -> Replay:
    """Replay early stopping with ``patience`` over the per-epoch ``values`` (epoch i is
    ``values[i]``); ``mode``: ``min`` for a loss, ``max`` for an accuracy. As Lightning,
    the wait counts from before the first epoch (a best of infinity), and a non-finite
    value never improves."""
    sign = 1.0 if mode == "min" else -1.0
    best_epoch, best = None, math.inf
    for epoch, value in enumerate(values):
        score = sign * value
        if math.isfinite(score) and (best_epoch is None or score < best - abs(min_delta)):
            best_epoch, best = epoch, score
        elif epoch - (-1 if best_epoch is None else best_epoch) >= patience:
            return _replay(patience, best_epoch, sign * best, epoch, len(values) - 1 - epoch)
    return _replay(patience, best_epoch, sign * best, None, 0)


def _replay(patience: int, epoch: int | None, value: float, stopped, saved: int) -> Replay:
    return Replay(patience, epoch, value if epoch is not None else math.nan, stopped, saved)


def replays(
    history: list[dict[str, float]],
    monitor: str = "val/loss",
    mode: str = "min",
    min_delta: float = 0.0,
    patiences: tuple[int, ...] = PATIENCES,
) -> list[Replay]:
    """The replay of each patience over a run's history rows."""
    values = [row[monitor] for row in history]
    return [patience_replay(values, p, mode, min_delta) for p in patiences]
