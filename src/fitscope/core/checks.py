"""Validation helpers: every bad value is caught before any work starts."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any, TypeVar

from fitscope.core.errors import FitscopeError

T = TypeVar("T")


def from_mapping(cls: type[T], section: str, values: dict[str, Any] | None) -> T:
    """Build dataclass ``cls`` from a config mapping, refusing unknown keys."""
    values = dict(values or {})
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise FitscopeError(f"unknown key(s) {unknown} in {section}. Fix: use only {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise FitscopeError(f"bad {section}: {exc}. Fix: correct the values") from exc


def check_choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    """``value`` must be one of ``choices``."""
    if value not in choices:
        raise FitscopeError(f"{where}={value!r} is not valid. Fix: use one of {list(choices)}")


def check_number(
    where: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
    integer: bool = False,
    allow_none: bool = False,
) -> None:
    """``value`` must be a number in [low, high] (or [low, high) with ``high_open``)."""
    if value is None and allow_none:
        return
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok_type or isinstance(value, bool):
        raise FitscopeError(f"{where}={value!r} must be {kind}. Fix: correct the config")
    if not math.isfinite(value):  # NaN passes every comparison below
        raise FitscopeError(f"{where}={value!r} must be a finite number. Fix: correct the config")
    if low is not None and value < low:
        raise FitscopeError(f"{where}={value!r} must be >= {low}. Fix: correct the config")
    if high is not None and (value >= high if high_open else value > high):
        bound = f"< {high}" if high_open else f"<= {high}"
        raise FitscopeError(f"{where}={value!r} must be {bound}. Fix: correct the config")


# Names that end up in paths, MLflow experiment/run names and filter strings.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(where: str, value: Any, *, allow_none: bool = False) -> None:
    """``value`` must be a safe name: ``[A-Za-z0-9][A-Za-z0-9_.-]*`` and no ``..``."""
    if value is None and allow_none:
        return
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value) or ".." in value:
        raise FitscopeError(
            f"{where}={value!r} is not a valid name. Fix: use letters, digits, '_', '.' and "
            "'-' only, starting with a letter or digit, without '..'"
        )
