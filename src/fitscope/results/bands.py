"""Statistics over seeds: a mean and its band per epoch or per point, and the paired
interval of a difference (each regularizer against its baseline, seed by seed)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Band:
    """Mean ± std of a quantity over seeds, at each x (std 0 where one seed reached it)."""

    x: list[float]
    mean: list[float]
    std: list[float]

    @property
    def low(self) -> list[float]:
        return [m - s for m, s in zip(self.mean, self.std, strict=True)]

    @property
    def high(self) -> list[float]:
        return [m + s for m, s in zip(self.mean, self.std, strict=True)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """The mean of ``values`` and their sample std (0 for one value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def band_over(x: list[float], groups: list[list[float]]) -> Band:
    """The mean ± std of each group of values (one per seed), at each ``x``."""
    stats = [mean_std(group) for group in groups]
    return Band(list(x), [m for m, _ in stats], [s for _, s in stats])


def epoch_band(histories: list[list[dict[str, float]]], key: str) -> Band:
    """``key`` per epoch (1-based) over the seeds' histories: the mean and std of the seeds
    that trained that epoch (early stopping ends seeds at different epochs)."""
    by_epoch: dict[int, list[float]] = {}
    for history in histories:
        for row in history:
            by_epoch.setdefault(int(row["epoch"]) + 1, []).append(row[key])
    epochs = sorted(by_epoch)
    return band_over([float(e) for e in epochs], [by_epoch[e] for e in epochs])


@dataclass(frozen=True)
class PairedDifference:
    """The mean of paired differences (variant - baseline, seed by seed) and its interval;
    ``low``/``high`` are None with fewer than two pairs."""

    mean: float
    pairs: int
    low: float | None = None
    high: float | None = None

    def reading(self, lower_is_better: bool = True) -> str:
        """``lower``, ``higher`` or ``no clear difference`` (the interval holds 0)."""
        if self.low is None or self.high is None:
            return "one seed: no interval (study.seeds: 0,1,2)"
        if self.low <= 0 <= self.high:
            return "no clear difference"
        better = (self.high < 0) == lower_is_better
        return f"{'lower' if self.high < 0 else 'higher'} ({'better' if better else 'worse'})"


def paired_difference(variant: dict[str, float], baseline: dict[str, float]) -> PairedDifference:
    """``variant[s] - baseline[s]`` over the seeds ``s`` both have, with the 95% confidence
    interval of its mean from the paired t-test (scipy.stats.ttest_rel).

    Not a bootstrap: with the 2-5 seeds a study runs, a percentile bootstrap's interval is
    about the range of the differences (exactly [min, max] for 3), so three differences of
    one sign would read as a clear difference about one time in four by chance alone."""
    seeds = [s for s in variant if s in baseline]
    if not seeds:
        raise ValueError("no seed in common")
    deltas = [variant[s] - baseline[s] for s in seeds]
    mean = statistics.fmean(deltas)
    if len(deltas) < 2:
        return PairedDifference(mean, 1)
    if max(deltas) == min(deltas):  # no spread: the t interval is undefined, the value exact
        return PairedDifference(mean, len(deltas), mean, mean)
    from scipy.stats import ttest_rel

    test = ttest_rel([variant[s] for s in seeds], [baseline[s] for s in seeds])
    interval = test.confidence_interval(CONFIDENCE)
    return PairedDifference(mean, len(deltas), float(interval.low), float(interval.high))
