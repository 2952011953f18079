"""The DVC stages that train: their Hydra overrides come from params.yaml, never a shell.

DVC runs a stage's ``cmd`` through a shell, so a value interpolated into it from
params.yaml (``$(...)``, backticks) would be executed. The train and search stages
therefore pass only their stage key; the overrides are read and split here.
"""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any

from fitscope.config import check_name
from fitscope.errors import FitscopeError


def _section(params: dict[str, Any], *keys: str) -> Any:
    value: Any = params
    for depth, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            where = ".".join(keys[: depth + 1])
            raise FitscopeError(f"params.yaml has no {where}. Fix: add it (see the README)")
        value = value[key]
    return value


def stage_variant(variant: str | None) -> str:
    """``variant``, or the key of the DVC stage running us (``DVC_STAGE=train@<key>``)."""
    if variant:
        return variant
    stage = os.environ.get("DVC_STAGE", "")
    if not stage.startswith("train@"):
        raise FitscopeError(
            "no variant given and not run as a DVC train stage. Fix: `fitscope train <variant>` "
            "with a key of params.yaml's variants"
        )
    return stage.removeprefix("train@")


def train_overrides(params: dict[str, Any], variant: str) -> list[str]:
    """The Hydra overrides of DVC stage ``train@<variant>``.

    ``variants.<name>.overrides`` is split into words as a shell would (quotes work)
    but never run through one: ``$(...)`` stays literal text, which the schema refuses.
    """
    check_name("variant", variant)
    try:
        overrides = shlex.split(str(_section(params, "variants", variant, "overrides")))
    except ValueError as exc:
        raise FitscopeError(
            f"variants.{variant}.overrides cannot be split ({exc}). Fix: balance its quotes"
        ) from None
    profile = _section(params, "study", "profile")
    return [
        *overrides,
        f"+profile={profile}",
        f"seed={_section(params, 'study', 'seeds')}",
        f"study={_section(params, 'variants', variant, 'study')}",
        f"variant={variant}",
        f"tracking.parent_key=dvc-{profile}",
        "force=true",
        f"hydra.sweep.dir=runs/{variant}",
    ]


def search_overrides(params: dict[str, Any], sampler: str) -> list[str]:
    """The Hydra overrides of DVC stage ``search@<sampler>`` (search/dvc.yaml)."""
    return [
        f"hparams_search=mnist_{sampler}",
        f"hydra.sweeper.n_trials={_section(params, 'search', 'trials')}",
        f"trainer.max_epochs={_section(params, 'search', 'epochs')}",
        f"hydra.sweep.dir=search/runs/{sampler}",
        "force=true",
    ]


def run_train(overrides: list[str]) -> None:
    """``fitscope-train -m OVERRIDES`` in this process (one Python start per stage)."""
    from fitscope.train import main

    sys.argv = ["fitscope-train", "-m", *overrides]
    main()
