"""A search space from Hydra's sweep overrides (``hydra.sweeper.params`` and the command
line): ``interval(a, b)`` and ``tag(log, interval(a, b))`` are float (or int) ranges,
``choice(...)``/``a,b,c`` and ``range(...)`` categorical; every other override is fixed."""

from __future__ import annotations

from typing import Any

from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)

from fitscope.core.errors import FitscopeError


def distribution(override: Override) -> Any:
    """The Optuna distribution of one sweep override."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, IntervalSweep):
        log = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(value.start, value.end, log=log)
        low, high = float(value.start), float(value.end)
        if low >= high or (log and low <= 0):
            positive = " and positive for a log scale" if log else ""
            raise FitscopeError(
                f"search dimension {key}: interval({value.start}, {value.end}) is empty or "
                f"reversed. Fix: give interval(low, high) with low < high{positive}"
            )
        return FloatDistribution(low, high, log=log)
    if isinstance(value, ChoiceSweep | RangeSweep):
        choices = tuple(override.sweep_iterator(transformer=lambda v: v))
        return CategoricalDistribution(choices)
    raise FitscopeError(f"search dimension {key}: {override.input_line} is not a sweep")


def split_space(overrides: list[Override]) -> tuple[list[str], dict[str, Any]]:
    """The fixed overrides (as typed) and the search dimensions (name -> distribution)."""
    fixed, space = [], {}
    for override in overrides:
        if override.is_sweep_override():
            space[override.get_key_element()] = distribution(override)
        else:
            fixed.append(override.input_line)
    return fixed, space


def override_line(name: str, value: Any) -> str:
    """``name=value`` that Hydra parses back to exactly ``value`` (floats by their repr)."""
    if isinstance(value, bool) or value is None:
        return f"{name}={'null' if value is None else str(value).lower()}"
    if isinstance(value, float):
        return f"{name}={value!r}"
    return f"{name}={value}"
