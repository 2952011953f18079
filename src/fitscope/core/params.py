"""Reading params.yaml, the DVC parameters file (one-line errors for a missing or bad file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fitscope.core.errors import FitscopeError


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read the DVC parameters file."""
    path = Path(path)
    if not path.is_file():
        raise FitscopeError(f"{path} not found. Fix: run from the repository root")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise FitscopeError(f"{path} is not valid YAML ({exc}). Fix: correct the file") from exc
    if not isinstance(params, dict):
        raise FitscopeError(f"{path} must be a mapping. Fix: correct the file")
    return params
