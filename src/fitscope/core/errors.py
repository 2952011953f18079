"""The one exception type for problems a user can cause and fix."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run_cli(func: Callable[[], Any]) -> Any:
    """Run ``func``; turn a FitscopeError into a one-line message and exit code 2."""
    try:
        return func()
    except FitscopeError as exc:
        print(f"fitscope: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("fitscope: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


class FitscopeError(Exception):
    """A user-fixable problem. The message names the problem and the fix on one line."""


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (at most 300 characters), for one-line messages."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
