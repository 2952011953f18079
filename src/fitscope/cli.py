"""The ``fitscope`` command: its subcommands, and where each one's code lives.

The DVC stages call these subcommands. Each subcommand's handler is imported only when it
runs (by its name in :data:`COMMANDS`), so no command pays for another's imports (data:
polars, requests; train: Lightning; report: matplotlib), and a DVC stage depends on the
code of its own command only (tests/test_dvc_deps.py). Every user-fixable error is printed
as one line (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
from collections.abc import Sequence

from fitscope.core.errors import run_cli

# subcommand -> "module:function" that runs it (with the parsed arguments).
COMMANDS = {
    "fetch": "fitscope.data.commands:cmd_fetch",
    "split": "fitscope.data.commands:cmd_split",
    "mirror": "fitscope.data.commands:cmd_mirror",
    "synth-higgs": "fitscope.data.commands:cmd_synth_higgs",
    "train": "fitscope.pipeline.commands:cmd_train",
    "search": "fitscope.pipeline.commands:cmd_search",
    "diagnose": "fitscope.pipeline.commands:cmd_diagnose",
    "evaluate": "fitscope.results.commands:cmd_evaluate",
    "report": "fitscope.report.commands:cmd_report",
    "summary": "fitscope.report.commands:cmd_summary",
    "runs reconcile": "fitscope.pipeline.runs_commands:cmd_runs_reconcile",
    "runs sync": "fitscope.pipeline.runs_commands:cmd_runs_sync",
    "stack": "fitscope.stack.commands:cmd_stack",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitscope", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="DVC params file")
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch", help="download/copy and verify a raw dataset")
    fetch.add_argument("dataset", choices=["higgs", "mnist"])
    fetch.add_argument("--out", help="output directory (default data/raw/<dataset>)")
    fetch.set_defaults(command_key="fetch")

    split = sub.add_parser("split", help="parse and split a raw dataset into .npy arrays")
    split.add_argument("dataset", choices=["higgs", "mnist"])
    split.add_argument("--raw", help="raw directory (default data/raw/<dataset>)")
    split.add_argument("--out", help="output directory (default data/processed/<dataset>)")
    split.set_defaults(command_key="split")

    mirror = sub.add_parser("mirror", help="download the official files into a local mirror")
    mirror.add_argument(
        "--dir",
        help="mirror directory (default: data.<dataset>.mirror when it is a local directory, "
        "else data/mirror, which data.dvc tracks)",
    )
    mirror.add_argument(
        "--datasets", nargs="+", choices=["higgs", "mnist"], default=["higgs", "mnist"]
    )
    mirror.add_argument(
        "--checksums-only",
        action="store_true",
        help="only (re)write checksums.json for the files already in the mirror",
    )
    mirror.set_defaults(command_key="mirror")

    synth = sub.add_parser(
        "synth-higgs",
        help="write a synthetic HIGGS.csv.gz in the real layout (+ checksums.json): a mirror "
        "for tests and benchmarks of size=full",
    )
    synth.add_argument("dir", nargs="?", default="data/synthetic", help="(git-ignored default)")
    synth.add_argument("--rows", type=int, default=11_000_000, help="default: the real file's")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(command_key="synth-higgs")

    train = sub.add_parser(
        "train", help="train a dataset's variants of params.yaml (DVC train stage), or one"
    )
    train.add_argument(
        "name",
        nargs="?",
        help="a dataset under params.yaml's variants, or one variant (default: from DVC_STAGE)",
    )
    train.set_defaults(command_key="train")

    diagnose = sub.add_parser(
        "diagnose",
        help="train the diagnostics of params.yaml: the runs behind the learning and "
        "validation curves (DVC diagnose stage)",
    )
    diagnose.add_argument(
        "dataset", nargs="?", help="only this dataset's (default: every dataset's)"
    )
    diagnose.set_defaults(command_key="diagnose")

    search = sub.add_parser("search", help="run the params.yaml search with one sampler")
    search.add_argument("sampler", choices=["random", "tpe"])
    search.set_defaults(command_key="search")

    evaluate = sub.add_parser(
        "evaluate", help="average each trained variant's test scores (DVC evaluate stage)"
    )
    evaluate.add_argument("dataset", help="runs/<dataset> holds its variants' runs")
    evaluate.add_argument("--runs", default="runs")
    evaluate.add_argument("--out", default="metrics")
    evaluate.set_defaults(command_key="evaluate")

    report = sub.add_parser("report", help="write reports/study.md and study.html")
    report.add_argument("--runs", default="runs")
    report.add_argument("--metrics", default="metrics")
    report.add_argument("--out", default="reports")
    report.set_defaults(command_key="report")

    summary = sub.add_parser(
        "summary", help="print the comparison table, the champions and where the report is"
    )
    summary.add_argument("--runs", default="runs")
    summary.add_argument("--metrics", default="metrics")
    summary.add_argument("--out", default="reports")
    summary.set_defaults(command_key="summary")

    runs = sub.add_parser("runs", help="MLflow run housekeeping")
    runs_sub = runs.add_subparsers(dest="runs_command", required=True)
    reconcile = runs_sub.add_parser(
        "reconcile",
        help="end as KILLED the RUNNING runs whose process is gone (crash, kill -9, power loss)",
    )
    reconcile.add_argument("--experiment", help="only this experiment (default: all)")
    reconcile.add_argument(
        "--stale-after",
        type=float,
        metavar="S",
        help="seconds without a heartbeat after which a run of another host counts as dead "
        "(default: $FITSCOPE_STALE_AFTER_S or 600)",
    )
    reconcile.set_defaults(command_key="runs reconcile")
    sync = runs_sub.add_parser(
        "sync",
        help="upload the runs kept on disk while the tracking server was unreachable "
        "(idempotent: running it again duplicates nothing)",
    )
    sync.add_argument(
        "--dir", help="pending records (default: $FITSCOPE_PENDING_DIR or ./mlruns-pending)"
    )
    sync.set_defaults(command_key="runs sync")

    team = sub.add_parser("stack", help="the local team stack (docs/team.md)")
    team.add_argument("stack_command", choices=["up", "down", "status"])
    team.add_argument("--state-dir", default=".stack", help="PIDs, logs, data, credentials")
    team.add_argument("--env-file", default="stack.env", help="client settings (mode 600)")
    team.add_argument(
        "--port", action="append", default=[], metavar="NAME=N", help="override a port"
    )
    team.add_argument(
        "--components",
        nargs="+",
        default=["postgres", "s3", "mlflow", "ray"],
        help="start only these (mlflow needs postgres and s3)",
    )
    team.add_argument(
        "--no-dvc-remote", action="store_true", help="leave the DVC remote config alone"
    )
    team.set_defaults(command_key="stack")
    return parser


def handler(key: str):
    """The function that runs subcommand ``key`` (its module imported now)."""
    module, function = COMMANDS[key].split(":")
    return getattr(importlib.import_module(module), function)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    run_cli(lambda: handler(args.command_key)(args))


if __name__ == "__main__":
    main()
