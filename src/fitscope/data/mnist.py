"""MNIST: fetching the digits (embedded 5k sample, the official IDX files or a mirror,
md5-checked) and a class-balanced split.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from isal import igzip

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import sha256_file, write_gzip, write_json
from fitscope.data import official
from fitscope.data.download import DEFAULT_RETRY, RetryPolicy, download_file
from fitscope.data.higgs_csv import _GZIP_ERRORS
from fitscope.data.official import MNIST_EMBEDDED, MNIST_EMBEDDED_SHA256, join_url, mirror_base
from fitscope.data.params import MnistParams
from fitscope.data.splits import require_raw, write_splits


# --- MNIST -------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike[str], *, ndim: int) -> np.ndarray:
    """Parse a gzip IDX file of unsigned bytes, validating magic number and sizes."""
    path = Path(path)
    require_raw(path, "mnist")
    fix = "Fix: fetch it again with `dvc repro -f -s fetch_mnist`"
    try:
        with igzip.open(path, "rb") as fh:
            raw = fh.read()
    except _GZIP_ERRORS as exc:
        raise FitscopeError(f"{path} is not a complete gzip file ({exc}). {fix}") from exc
    header = 4 + 4 * ndim
    if not raw:
        raise FitscopeError(f"{path} decompresses to nothing (an empty IDX file). {fix}")
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise FitscopeError(
            f"{path} has a bad IDX magic number {raw[:4].hex()} (expected "
            f"000008{ndim:02x}): the file is corrupt or not MNIST. {fix}"
        )
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    expected = math.prod(dims)
    if min(dims) < 0 or len(raw) - header != expected:
        raise FitscopeError(
            f"{path} declares dimensions {dims} ({expected} bytes) but holds "
            f"{len(raw) - header} bytes: the file is truncated or corrupt. {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write a uint8 array as a gzip IDX file (the official MNIST format)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    write_gzip(path, header + array.tobytes())


def embedded_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST training digits shipped in the package: (images, labels)."""
    with resources.as_file(resources.files("fitscope.resources") / MNIST_EMBEDDED) as src:
        if sha256_file(src) != MNIST_EMBEDDED_SHA256:
            raise FitscopeError(
                f"the embedded {MNIST_EMBEDDED} is corrupt. Fix: reinstall fitscope"
            )
        table = np.loadtxt(src, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1].copy()


def fetch_mnist(
    params: MnistParams, out_dir: str | os.PathLike[str], policy: RetryPolicy = DEFAULT_RETRY
) -> dict[str, Any]:
    """Put MNIST IDX files into ``out_dir`` (embedded digits are written as IDX too)."""
    out_dir = Path(out_dir)
    used: dict[str, str] = {}
    if params.source == "embedded":
        images, labels = embedded_mnist()
        write_idx(out_dir / "train-images-idx3-ubyte.gz", images)
        write_idx(out_dir / "train-labels-idx1-ubyte.gz", labels)
        used = {"train": f"embedded:{MNIST_EMBEDDED}"}
    else:
        if params.source == "official":
            bases = list(official.MNIST_MIRRORS)
            fix = "check the network, or use a mirror (data.mnist.source: mirror and .mirror)"
        else:
            bases = [mirror_base("data.mnist", params.mirror)]
            fix = "check data.mnist.mirror (`fitscope mirror` makes one)"
        for name, md5 in official.MNIST_FILES.items():
            sources = [join_url(base, name) for base in bases]
            used[name] = download_file(
                sources, out_dir / name, checksum=f"md5:{md5}", policy=policy, fix=fix
            )
    files = {p.name: sha256_file(p) for p in sorted(out_dir.glob("*-ubyte.gz"))}
    info = {"dataset": "mnist", "source": params.source, "urls": used, "sha256": files}
    write_json(out_dir / "source.json", info)
    return info


def _read_mnist_pair(raw_dir: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(raw_dir / f"{prefix}-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(raw_dir / f"{prefix}-labels-idx1-ubyte.gz", ndim=1)
    if images.shape[1:] != (28, 28) or len(images) != len(labels):
        raise FitscopeError(
            f"{raw_dir}/{prefix}-*: {len(images)} images of {images.shape[1:]} vs "
            f"{len(labels)} labels (expected 28x28 and equal counts). Fix: fetch them again "
            "with `dvc repro -f -s fetch_mnist`"
        )
    if labels.max(initial=0) > 9:
        raise FitscopeError(
            f"{raw_dir}/{prefix}-labels: labels above 9. Fix: fetch it again with "
            "`dvc repro -f -s fetch_mnist`"
        )
    return images, labels


def balanced_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A seeded permutation whose every prefix is class-balanced (round-robin over classes)."""
    order = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)
    for cls in np.unique(labels):
        members = order[labels[order] == cls]
        rank[members] = np.arange(len(members))
    # Sort by within-class rank; ties (one per class) keep the random order.
    return order[np.argsort(rank[order], kind="stable")]


def split_mnist(
    params: MnistParams, raw_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """Seeded, class-balanced validation/test hold-outs; the rest is the training pool.

    The training pool is stored in balanced order, so its first N digits (the
    experiment's ``data.train_size``) are a stratified subset.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    rng = np.random.default_rng(params.seed)
    images, labels = _read_mnist_pair(raw_dir, "train")
    order = balanced_order(labels, rng)
    n_val = params.val_size
    if params.source == "embedded":
        n_test = params.test_size if params.test_size is not None else 1000
        if n_val + n_test >= len(labels):
            raise FitscopeError(
                f"the MNIST split asks for {n_val} validation + {n_test} test digits but only "
                f"{len(labels)} exist. Fix: lower data.mnist sizes in params.yaml"
            )
        val, test, pool = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
        test_x, test_y = images[test], labels[test]
    else:
        if n_val >= len(labels):
            raise FitscopeError(
                f"data.mnist.val_size={n_val} exceeds {len(labels)} digits. Fix: lower it"
            )
        val, pool = order[:n_val], order[n_val:]
        test_x, test_y = _read_mnist_pair(raw_dir, "t10k")
        if params.test_size is not None:
            if params.test_size > len(test_y):
                raise FitscopeError(
                    f"data.mnist.test_size={params.test_size} exceeds the {len(test_y)} test "
                    "digits. Fix: lower it or set it to null"
                )
            keep = balanced_order(test_y, rng)[: params.test_size]
            test_x, test_y = test_x[keep], test_y[keep]

    def flat(a: np.ndarray) -> np.ndarray:
        return a.reshape(len(a), -1).astype(np.float32) / 255.0

    splits = {
        "train": (flat(images[pool]), labels[pool].astype(np.int64), None),
        "val": (flat(images[val]), labels[val].astype(np.int64), None),
        "test": (flat(test_x), test_y.astype(np.int64), None),
    }
    return write_splits("mnist", splits, raw_dir, out_dir, params=asdict(params))
