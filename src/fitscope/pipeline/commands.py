"""``fitscope train`` and ``fitscope search``: a DVC stage's jobs from params.yaml, run as
one Hydra sweep in this process.
"""

from __future__ import annotations

import argparse

from fitscope.core.params import load_params
from fitscope.pipeline.diagnostics import RUNS_DIR
from fitscope.pipeline.entry import run_train
from fitscope.pipeline.stages import diagnose_sweep, search_overrides, train_sweep
from fitscope.pipeline.variants import stage_target


def cmd_train(args: argparse.Namespace) -> None:

    name = stage_target(args.name)
    run_train(*train_sweep(load_params(args.params), name))


def cmd_diagnose(args: argparse.Namespace) -> None:

    overrides, jobs = diagnose_sweep(load_params(args.params), args.dataset)
    if not jobs:  # switched off (`diagnostics: {}`): the stage's output is an empty folder
        RUNS_DIR.mkdir(parents=True, exist_ok=True)
        print(f"params.yaml has no diagnostics: nothing to train ({RUNS_DIR}/ left empty)")
        return
    run_train(overrides, jobs)


def cmd_search(args: argparse.Namespace) -> None:

    run_train(search_overrides(load_params(args.params), args.sampler))
