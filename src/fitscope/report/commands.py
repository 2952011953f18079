"""``fitscope report`` and ``fitscope summary``."""

from __future__ import annotations

import argparse

from fitscope.core.params import load_params
from fitscope.report.study import write_study_report
from fitscope.report.summary import print_summary


def cmd_report(args: argparse.Namespace) -> None:

    params = load_params(args.params)
    path = write_study_report(params, args.runs, args.metrics, args.out)
    print(f"report written to {path} (and {path.with_suffix('.html')})")
    print_summary(params, args.runs, args.metrics, args.out)


def cmd_summary(args: argparse.Namespace) -> None:

    print_summary(load_params(args.params), args.runs, args.metrics, args.out)
