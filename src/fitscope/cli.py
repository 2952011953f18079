"""The ``fitscope`` command: the DVC stages call its subcommands.

Every user-fixable error is printed as one line (no traceback) with a non-zero exit.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from fitscope.config import check_name, from_mapping
from fitscope.errors import FitscopeError

log = logging.getLogger("fitscope")


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


# Each command imports what it needs when it runs (data and downloads: pyarrow, requests;
# train: Lightning; report: matplotlib), so no command pays for another's imports.


def _retry_policy(params: dict[str, Any]):
    from fitscope.download import RetryPolicy

    return from_mapping(RetryPolicy, "download", params.get("download"))


def cmd_fetch(args: argparse.Namespace) -> None:
    from fitscope import data

    params = load_params(args.params)
    out = Path(args.out or f"data/raw/{args.dataset}")
    if args.dataset == "higgs":
        info = data.fetch_higgs(data.higgs_params(params.get("data")), out, _retry_policy(params))
    else:
        info = data.fetch_mnist(data.mnist_params(params.get("data")), out, _retry_policy(params))
    print(f"fetched {args.dataset} from {info['source']} into {out}")
    if "head_sha256" in info:
        pinned = "data.higgs.head_sha256" in info["verified_by"]
        print(
            f"the first {info['rows']} rows have sha256 {info['head_sha256']}"
            + ("" if pinned else " (pin it as data.higgs.head_sha256 to refuse changed data)")
        )


def cmd_split(args: argparse.Namespace) -> None:
    from fitscope import data

    params = load_params(args.params)
    raw = Path(args.raw or f"data/raw/{args.dataset}")
    out = Path(args.out or f"data/processed/{args.dataset}")
    if args.dataset == "higgs":
        from fitscope.progress import ByteProgress

        gz = raw / data.HIGGS_FILE
        total = gz.stat().st_size if gz.is_file() else None
        with ByteProgress(total, f"split higgs: {gz}") as shown:
            higgs = data.higgs_params(params.get("data"))
            manifest = data.split_higgs(higgs, raw, out, on_bytes=shown.update)
    else:
        manifest = data.split_mnist(data.mnist_params(params.get("data")), raw, out)
    sizes = ", ".join(f"{k}={v['rows']}" for k, v in manifest["splits"].items())
    print(f"split {args.dataset}: {sizes} -> {out}")


def cmd_mirror(args: argparse.Namespace) -> None:
    from fitscope import data

    params = load_params(args.params)
    targets = data.mirror_targets(params.get("data"), tuple(args.datasets), args.dir)
    written: list[Path] = []
    for directory, datasets in targets.items():
        if args.checksums_only:
            written.append(data.write_mirror_checksums(directory))
        else:
            written += data.fill_mirror(directory, datasets, _retry_policy(params))
    print(f"{len(written)} file(s) written, checksums in {data.CHECKSUMS_FILE}")
    for directory, datasets in targets.items():
        keys = " ".join(
            f"-S data.{d}.source=mirror -S data.{d}.mirror={directory}" for d in datasets
        )
        print(f"to use {directory}: dvc exp run {keys}")
    if Path(data.DEFAULT_MIRROR_DIR) in targets:
        print(f"to share {data.DEFAULT_MIRROR_DIR}: dvc commit data.dvc && dvc push")


def cmd_synth_higgs(args: argparse.Namespace) -> None:
    from fitscope import data
    from fitscope.synthetic import write_synthetic_higgs

    if args.rows < 1:
        raise FitscopeError(f"--rows {args.rows} must be at least 1. Fix: e.g. --rows 20000")
    out = Path(args.dir)
    digest = write_synthetic_higgs(out / data.HIGGS_FILE, args.rows, seed=args.seed)
    data.write_mirror_checksums(out)
    print(f"wrote {args.rows} synthetic rows to {out / data.HIGGS_FILE} (sha256 {digest})")
    print(
        f"a mirror with {data.CHECKSUMS_FILE}: dvc exp run -S data.higgs.source=mirror "
        f"-S data.higgs.mirror={out} -S data.higgs.size=full"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from fitscope import stages

    name = stages.stage_target(args.name)
    stages.run_train(*stages.train_sweep(load_params(args.params), name))


def cmd_search(args: argparse.Namespace) -> None:
    from fitscope import stages

    stages.run_train(stages.search_overrides(load_params(args.params), args.sampler))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from fitscope.evaluate import evaluate_dataset

    check_name("dataset", args.dataset)
    keys = ("test_loss", "test_acc", "test_auroc", "train_eval_loss")
    for variant, result in evaluate_dataset(args.dataset, args.runs, args.out).items():
        shown = ", ".join(f"{k}={result[k]:.4f}" for k in keys if k in result)
        print(f"evaluated {variant}: {shown}")


def cmd_report(args: argparse.Namespace) -> None:
    from fitscope.report import write_study_report
    from fitscope.report.summary import print_summary

    params = load_params(args.params)
    path = write_study_report(params, args.runs, args.metrics, args.out)
    print(f"report written to {path} (and {path.with_suffix('.html')})")
    print_summary(params, args.runs, args.metrics, args.out)


def cmd_summary(args: argparse.Namespace) -> None:
    from fitscope.report.summary import print_summary

    print_summary(load_params(args.params), args.runs, args.metrics, args.out)


def cmd_runs_reconcile(args: argparse.Namespace) -> None:
    from fitscope import tracking

    if args.stale_after is not None and not args.stale_after > 0:
        raise FitscopeError(
            f"--stale-after {args.stale_after:g} must be a positive number of seconds. "
            "Fix: e.g. --stale-after 600"
        )
    client = tracking.existing_client()
    changed, running, names = tracking.reconcile_store(client, args.experiment, args.stale_after)
    for run in changed:
        print(f"KILLED {run.run_id} {names[run.experiment_id]}/{run.run_name}: {run.reason}")
    print(
        f"reconciled {len(names)} experiment(s): {len(changed)} run(s) KILLED, "
        f"{len(running)} still RUNNING"
    )


def cmd_runs_sync(args: argparse.Namespace) -> None:
    from fitscope import tracking
    from fitscope.pending import spool_dir

    spool = Path(args.dir) if args.dir else spool_dir()
    client = tracking.existing_client()
    results = tracking.sync_pending(client, spool)
    for r in results:
        print(f"{'synced' if r.done else 'left'} {r.sync_id} -> run {r.run_id or '-'}: {r.note}")
    synced = sum(r.done for r in results)
    print(
        f"synced {synced} record(s) from {spool} to {client.tracking_uri}; "
        f"{len(results) - synced} left pending"
    )


def cmd_stack(args: argparse.Namespace) -> None:
    from fitscope import stack

    state = Path(args.state_dir)
    if args.stack_command == "down":
        stopped = stack.stop_stack(state)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'} (data kept in {state})")
        return
    if args.stack_command == "status":
        for name, pid in stack.stack_status(state).items():
            print(f"{name:9}{'running, pid ' + str(pid) if pid else 'stopped'}")
        return
    ports = {}
    for item in args.port:
        name, _, value = item.partition("=")
        if name not in stack.DEFAULT_PORTS or not value.isdigit():
            raise FitscopeError(
                f"--port {item!r} is not NAME=NUMBER. Fix: NAME is one of "
                f"{', '.join(stack.DEFAULT_PORTS)}"
            )
        ports[name] = int(value)
    info = stack.start_stack(state, ports, args.components)
    env_file = stack.write_env_file(info, args.env_file)
    if "s3" in info.pids and not args.no_dvc_remote:
        stack.configure_dvc_remote(info)
        print(
            f"DVC remote '{stack.DVC_REMOTE}' -> {stack.DVC_URI} (credentials in .dvc/config.local)"
        )
    print(stack.usage(info, env_file))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fitscope", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="DVC params file")
    sub = parser.add_subparsers(dest="command", required=True)

    fetch = sub.add_parser("fetch", help="download/copy and verify a raw dataset")
    fetch.add_argument("dataset", choices=["higgs", "mnist"])
    fetch.add_argument("--out", help="output directory (default data/raw/<dataset>)")
    fetch.set_defaults(func=cmd_fetch)

    split = sub.add_parser("split", help="parse and split a raw dataset into .npy arrays")
    split.add_argument("dataset", choices=["higgs", "mnist"])
    split.add_argument("--raw", help="raw directory (default data/raw/<dataset>)")
    split.add_argument("--out", help="output directory (default data/processed/<dataset>)")
    split.set_defaults(func=cmd_split)

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
    mirror.set_defaults(func=cmd_mirror)

    synth = sub.add_parser(
        "synth-higgs",
        help="write a synthetic HIGGS.csv.gz in the real layout (+ checksums.json): a mirror "
        "for tests and benchmarks of size=full",
    )
    synth.add_argument("dir", nargs="?", default="data/synthetic", help="(git-ignored default)")
    synth.add_argument("--rows", type=int, default=11_000_000, help="default: the real file's")
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(func=cmd_synth_higgs)

    train = sub.add_parser(
        "train", help="train a dataset's variants of params.yaml (DVC train stage), or one"
    )
    train.add_argument(
        "name",
        nargs="?",
        help="a dataset under params.yaml's variants, or one variant (default: from DVC_STAGE)",
    )
    train.set_defaults(func=cmd_train)

    search = sub.add_parser("search", help="run the params.yaml search with one sampler")
    search.add_argument("sampler", choices=["random", "tpe"])
    search.set_defaults(func=cmd_search)

    evaluate = sub.add_parser(
        "evaluate", help="average each trained variant's test scores (DVC evaluate stage)"
    )
    evaluate.add_argument("dataset", help="runs/<dataset> holds its variants' runs")
    evaluate.add_argument("--runs", default="runs")
    evaluate.add_argument("--out", default="metrics")
    evaluate.set_defaults(func=cmd_evaluate)

    report = sub.add_parser("report", help="write reports/study.md and study.html")
    report.add_argument("--runs", default="runs")
    report.add_argument("--metrics", default="metrics")
    report.add_argument("--out", default="reports")
    report.set_defaults(func=cmd_report)

    summary = sub.add_parser(
        "summary", help="print the comparison table, the champions and where the report is"
    )
    summary.add_argument("--runs", default="runs")
    summary.add_argument("--metrics", default="metrics")
    summary.add_argument("--out", default="reports")
    summary.set_defaults(func=cmd_summary)

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
    reconcile.set_defaults(func=cmd_runs_reconcile)
    sync = runs_sub.add_parser(
        "sync",
        help="upload the runs kept on disk while the tracking server was unreachable "
        "(idempotent: running it again duplicates nothing)",
    )
    sync.add_argument(
        "--dir", help="pending records (default: $FITSCOPE_PENDING_DIR or ./mlruns-pending)"
    )
    sync.set_defaults(func=cmd_runs_sync)

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
    team.set_defaults(func=cmd_stack)
    return parser


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


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    run_cli(lambda: args.func(args))


if __name__ == "__main__":
    main()
