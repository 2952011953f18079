"""``fitscope train`` and ``fitscope search``: a DVC stage's jobs from params.yaml, run as
one Hydra sweep in this process.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fitscope.core.params import load_params
from fitscope.pipeline.entry import run_train
from fitscope.pipeline.stages import prune_runs, search_overrides, stage_runs, train_sweep
from fitscope.pipeline.variants import params_section, stage_target


def cmd_train(args: argparse.Namespace) -> None:

    name = stage_target(args.name)
    params = load_params(args.params)
    overrides, jobs = train_sweep(params, name)
    if name in params_section(params, "variants"):  # the whole stage, train@<name>
        prune_runs(Path("runs") / name, stage_runs(params, name))
    run_train(overrides, jobs)


def cmd_search(args: argparse.Namespace) -> None:

    run_train(search_overrides(load_params(args.params), args.sampler))
