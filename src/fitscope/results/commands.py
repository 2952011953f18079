"""``fitscope evaluate``: the DVC evaluate stage's command."""

from __future__ import annotations

import argparse

from fitscope.core.checks import check_name
from fitscope.results.contract import SCORE_KEYS
from fitscope.results.seeds import evaluate_dataset


def cmd_evaluate(args: argparse.Namespace) -> None:
    check_name("dataset", args.dataset)
    for variant, result in evaluate_dataset(args.dataset, args.runs, args.out).items():
        shown = ", ".join(f"{k}={result[k]:.4f}" for k in SCORE_KEYS if k in result)
        print(f"evaluated {variant}: {shown}")
