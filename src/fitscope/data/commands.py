"""The data subcommands: ``fitscope fetch``, ``split``, ``mirror`` and ``synth-higgs``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from fitscope.core.checks import from_mapping
from fitscope.core.errors import FitscopeError
from fitscope.core.params import load_params
from fitscope.core.progress import ByteProgress
from fitscope.data.download import RetryPolicy
from fitscope.data.higgs import fetch_higgs, split_higgs
from fitscope.data.mirror import fill_mirror, mirror_targets, write_mirror_checksums
from fitscope.data.mnist import fetch_mnist, split_mnist
from fitscope.data.official import CHECKSUMS_FILE, DEFAULT_MIRROR_DIR, HIGGS_FILE
from fitscope.data.params import higgs_params, mnist_params
from fitscope.data.synthetic import write_synthetic_higgs


def _retry_policy(params: dict[str, Any]):

    return from_mapping(RetryPolicy, "download", params.get("download"))


def cmd_fetch(args: argparse.Namespace) -> None:

    params = load_params(args.params)
    out = Path(args.out or f"data/raw/{args.dataset}")
    if args.dataset == "higgs":
        info = fetch_higgs(higgs_params(params.get("data")), out, _retry_policy(params))
    else:
        info = fetch_mnist(mnist_params(params.get("data")), out, _retry_policy(params))
    print(f"fetched {args.dataset} from {info['source']} into {out}")
    if "head_sha256" in info:
        pinned = "data.higgs.head_sha256" in info["verified_by"]
        print(
            f"the first {info['rows']} rows have sha256 {info['head_sha256']}"
            + ("" if pinned else " (pin it as data.higgs.head_sha256 to refuse changed data)")
        )


def cmd_split(args: argparse.Namespace) -> None:

    params = load_params(args.params)
    raw = Path(args.raw or f"data/raw/{args.dataset}")
    out = Path(args.out or f"data/processed/{args.dataset}")
    if args.dataset == "higgs":
        gz = raw / HIGGS_FILE
        total = gz.stat().st_size if gz.is_file() else None
        with ByteProgress(total, f"split higgs: {gz}") as shown:
            higgs = higgs_params(params.get("data"))
            manifest = split_higgs(higgs, raw, out, on_bytes=shown.update)
    else:
        manifest = split_mnist(mnist_params(params.get("data")), raw, out)
    sizes = ", ".join(f"{k}={v['rows']}" for k, v in manifest["splits"].items())
    print(f"split {args.dataset}: {sizes} -> {out}")


def cmd_mirror(args: argparse.Namespace) -> None:
    params = load_params(args.params)
    targets = mirror_targets(params.get("data"), tuple(args.datasets), args.dir)
    written: list[Path] = []
    for directory, datasets in targets.items():
        if args.checksums_only:
            written.append(write_mirror_checksums(directory))
        else:
            written += fill_mirror(directory, datasets, _retry_policy(params))
    print(f"{len(written)} file(s) written, checksums in {CHECKSUMS_FILE}")
    for directory, datasets in targets.items():
        keys = " ".join(
            f"-S data.{d}.source=mirror -S data.{d}.mirror={directory}" for d in datasets
        )
        print(f"to use {directory}: dvc exp run {keys}")
    if Path(DEFAULT_MIRROR_DIR) in targets:
        print(f"to share {DEFAULT_MIRROR_DIR}: dvc commit data.dvc && dvc push")


def cmd_synth_higgs(args: argparse.Namespace) -> None:

    if args.rows < 1:
        raise FitscopeError(f"--rows {args.rows} must be at least 1. Fix: e.g. --rows 20000")
    out = Path(args.dir)
    digest = write_synthetic_higgs(out / HIGGS_FILE, args.rows, seed=args.seed)
    write_mirror_checksums(out)
    print(f"wrote {args.rows} synthetic rows to {out / HIGGS_FILE} (sha256 {digest})")
    print(
        f"a mirror with {CHECKSUMS_FILE}: dvc exp run -S data.higgs.source=mirror "
        f"-S data.higgs.mirror={out} -S data.higgs.size=full"
    )
