"""``python -m fitscope.bench`` (``make bench``): which measurements run, and where the
figures go (printed, and merged into reports/bench.json).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from fitscope.bench.gpu import gpu_main, gpu_throughput
from fitscope.bench.ingest import BASE_ROWS, report_ingest
from fitscope.bench.load import load_figures
from fitscope.bench.loops import (
    bench_large,
    bench_tiny,
    embedded_higgs,
    matmul_peak_gflops,
    report_checkpoint_cost,
)
from fitscope.bench.record import BENCH_JSON, print_table, record
from fitscope.bench.startup import startup
from fitscope.bench.study import time_study
from fitscope.training.threads import usable_cpus


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fitscope.bench", description=__doc__)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--large-epochs", type=int, default=3)
    parser.add_argument("--large-rounds", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="GPU throughput figures only")
    parser.add_argument("--gpu-rows", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, help="write the --gpu figures as JSON here")
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint cost only")
    parser.add_argument(
        "--study",
        nargs="?",
        const="classic",
        metavar="PROFILE",
        help="also time `dvc repro` of the study (default profile classic) in a scratch copy",
    )
    parser.add_argument("--json", type=Path, default=BENCH_JSON, help="figures merged here")
    parser.add_argument("--startup", action="store_true", help="command start-up cost only")
    parser.add_argument("--ingest", action="store_true", help="full-HIGGS ingest figures only")
    parser.add_argument(
        "--ingest-rows", type=int, default=1_000_000, help="synthetic rows (figures per 11M)"
    )
    parser.add_argument("--ingest-file", type=Path, help="ingest this HIGGS.csv.gz instead")
    parser.add_argument(
        "--load",
        type=int,
        nargs="?",
        const=8,
        metavar="JOBS",
        help="tracking-server load only: JOBS (8) concurrent runs logging every epoch",
    )
    parser.add_argument("--load-epochs", type=int, default=25)
    parser.add_argument(
        "--load-uri", help="an existing tracking server (default: start a plain one here)"
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="every code path above at tiny sizes, in seconds (make test runs it): the "
        "figures it writes are not measurements",
    )
    return parser


def record_and_print(figures: dict[str, Any], out: Path) -> None:
    record(figures, out)  # first: a long --study run is never lost to a printing error
    print(f"figures merged into {out}:")
    print_table(figures)


def training_figures(args: argparse.Namespace) -> dict[str, Any]:
    """The tiny and large model figures (one thread), and the study's wall time."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dm = embedded_higgs(Path(tmp))
        figures = bench_tiny(dm, args.epochs, args.rounds)
        figures |= bench_large(dm, args.large_epochs, args.large_rounds, Path(tmp))
    if args.study:
        figures["study_profile"] = args.study
        figures |= time_study(args.study, study_peak, usable_cpus())
    figures["threads"] = 1
    return figures


def study_peak(precision: str) -> float:
    """One core's matmul peak at ``precision`` (the study's runs each use their share)."""
    torch.set_num_threads(1)
    return matmul_peak_gflops(precision=precision)


def smoke(out: Path) -> None:
    """Every path of ``make bench`` at tiny sizes: a changed signature or a broken path
    fails here (tests/test_bench.py) instead of in a user's hands."""
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dm = embedded_higgs(Path(tmp))
        figures = bench_tiny(dm, epochs=2, rounds=1)
        figures |= bench_large(dm, epochs=1, rounds=1, tmp=Path(tmp), tracked_epochs=3)
        report_checkpoint_cost(dm, Path(tmp))
    figures |= {"gpu_path_on_cpu": gpu_throughput(4_000, 500, "32-true", device="cpu")}
    with tempfile.TemporaryDirectory() as tmp:  # the team stack's load: tests/test_stack.py
        figures |= load_figures(jobs=2, epochs=2, uri=f"sqlite:///{tmp}/load.db", warmup_s=3)
    figures |= time_study("debug", study_peak, usable_cpus(), one_variant_per_dataset=True)
    figures["smoke"] = True
    record_and_print(figures, out)
    startup(out)
    report_ingest(BASE_ROWS + 5_000, None, out)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.smoke:
        smoke(args.json)
    elif args.load:
        record_and_print(load_figures(args.load, args.load_epochs, args.load_uri), args.json)
    elif args.ingest:
        report_ingest(args.ingest_rows, args.ingest_file, args.json)
    elif args.startup:
        startup(args.json)
    elif args.gpu:
        gpu_main(args.out, args.gpu_rows)
    elif args.checkpoint:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            report_checkpoint_cost(embedded_higgs(Path(tmp)), Path(tmp))
    else:
        record_and_print(training_figures(args), args.json)
        startup(args.json)
        report_ingest(args.ingest_rows, args.ingest_file, args.json)


if __name__ == "__main__":
    main()
