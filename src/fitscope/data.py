"""Acquire, parse, verify and split HIGGS and MNIST (the DVC data stages).

Raw files land in ``data/raw/<dataset>/``; splits land in
``data/processed/<dataset>/`` as memory-mappable ``.npy`` arrays plus a
``manifest.json`` that training runs are tagged with.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from isal import igzip

from fitscope.config import check_choice, check_number, from_mapping
from fitscope.download import (
    DEFAULT_RETRY,
    RetryPolicy,
    download_file,
    extract_zip_member,
    fetch_gzip_head,
)
from fitscope.errors import FitscopeError
from fitscope.fileio import atomic_path, sha256_file, write_gzip, write_json, write_npy

# --- official sources ------------------------------------------------------------------------
HIGGS_FILE = "HIGGS.csv.gz"
HIGGS_URLS = (
    "https://archive.ics.uci.edu/ml/machine-learning-databases/00280/HIGGS.csv.gz",
    "http://mlphysics.ics.uci.edu/data/higgs/HIGGS.csv.gz",
)
HIGGS_ZIP_URL = "https://archive.ics.uci.edu/static/public/280/higgs.zip"
HIGGS_SHA256 = "sha256:ea302c18164d4e3d916a1e2e83a9a8d07069fa6ebc7771e4c0540d54e593b698"
HIGGS_ROWS = 11_000_000
HIGGS_COLUMNS = 29  # label, 21 low-level, 7 high-level features
HIGGS_EMBEDDED = "HIGGS.sample.csv.gz"
HIGGS_EMBEDDED_SHA256 = "dd2e00428ba16414583a2fd52ad2128e233c7331c5a5212eef6c767b0bbde857"

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
MNIST_FILES = {  # file -> md5 of the official gzip
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_EMBEDDED = "mnist_5k.csv.gz"
MNIST_EMBEDDED_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"
MIRROR_ENV = "FITSCOPE_MIRROR"


# --- parameters (params.yaml `data:`) ------------------------------------------------------------
@dataclass(frozen=True)
class HiggsParams:
    """HIGGS source and split sizes. ``None`` sizes take the documented defaults."""

    source: str = "embedded"  # embedded | uci | mirror
    size: str = "study"  # study: only the rows the split needs; full: the whole file
    mirror: str | None = None
    val_rows: int = 1000
    train_rows: int | None = None
    test_rows: int | None = None

    def __post_init__(self) -> None:
        check_choice("data.higgs.source", self.source, ("embedded", "uci", "mirror"))
        check_choice("data.higgs.size", self.size, ("study", "full"))
        for key in ("val_rows", "train_rows", "test_rows"):
            check_number(
                f"data.higgs.{key}",
                getattr(self, key),
                low=1,
                integer=True,
                allow_none=key != "val_rows",
            )

    @property
    def streams_head(self) -> bool:
        return self.source != "embedded" and self.size == "study"

    def resolved_test_rows(self) -> int:
        if self.test_rows is not None:
            return self.test_rows
        return 500_000 if (self.source != "embedded" and self.size == "full") else 1000

    def resolved_train_rows(self) -> int | None:
        """Training rows: the classic 10,000 for official data; ``None`` = all (embedded)."""
        if self.train_rows is not None or self.source == "embedded":
            return self.train_rows
        return 10_000

    def head_rows(self) -> int:
        """Rows to stream from the top of the file: validation, training, then test."""
        return self.val_rows + (self.resolved_train_rows() or 0) + self.resolved_test_rows()


@dataclass(frozen=True)
class MnistParams:
    """MNIST source and split sizes (the training subset size is chosen per experiment)."""

    source: str = "embedded"  # embedded | official | mirror
    mirror: str | None = None
    val_size: int = 100
    test_size: int | None = None  # None: 1,000 held-out digits (embedded), all of t10k
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("data.mnist.source", self.source, ("embedded", "official", "mirror"))
        check_number("data.mnist.val_size", self.val_size, low=1, integer=True)
        check_number("data.mnist.test_size", self.test_size, low=1, integer=True, allow_none=True)
        check_number("data.mnist.seed", self.seed, low=0, integer=True)


def higgs_params(data_section: dict[str, Any] | None) -> HiggsParams:
    return from_mapping(HiggsParams, "data.higgs", (data_section or {}).get("higgs"))


def mnist_params(data_section: dict[str, Any] | None) -> MnistParams:
    return from_mapping(MnistParams, "data.mnist", (data_section or {}).get("mnist"))


def _mirror_base(section: str, mirror: str | None) -> str:
    base = mirror or os.environ.get(MIRROR_ENV)
    if not base:
        raise FitscopeError(
            f"{section}.source=mirror needs a location. Fix: set {section}.mirror in params.yaml "
            f"or the {MIRROR_ENV} environment variable to a base URL or directory"
        )
    return base


def _join(base: str, name: str) -> str:
    if base.startswith(("http://", "https://", "file://")):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def _copy_embedded(name: str, sha256: str, dest: Path) -> None:
    with resources.as_file(resources.files("fitscope.resources") / name) as src:
        if sha256_file(src) != sha256:
            raise FitscopeError(
                f"the embedded {name} is corrupt (checksum mismatch). Fix: reinstall fitscope "
                "(`make clean install`) or restore the file from git"
            )
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


# --- HIGGS -------------------------------------------------------------------------------------
def fetch_higgs(
    params: HiggsParams, out_dir: str | os.PathLike[str], policy: RetryPolicy = DEFAULT_RETRY
) -> dict[str, Any]:
    """Put the HIGGS rows the study needs into ``out_dir/HIGGS.csv.gz``; return its provenance."""
    out_dir = Path(out_dir)
    dest = out_dir / HIGGS_FILE
    if params.source == "embedded":
        _copy_embedded(HIGGS_EMBEDDED, HIGGS_EMBEDDED_SHA256, dest)
        used = f"embedded:{HIGGS_EMBEDDED}"
    else:
        if params.source == "uci":
            sources = list(HIGGS_URLS)
        else:
            sources = [_join(_mirror_base("data.higgs", params.mirror), HIGGS_FILE)]
        if params.streams_head:
            used = fetch_gzip_head(sources, dest, params.head_rows(), policy=policy)
        else:
            used = _fetch_higgs_full(sources, dest, params.source, policy)
    info = {
        "dataset": "higgs",
        "source": params.source,
        "size": params.size,
        "url": used,
        "file": HIGGS_FILE,
        "sha256": sha256_file(dest),
    }
    write_json(out_dir / "source.json", info)
    return info


def _fetch_higgs_full(sources: list[str], dest: Path, source: str, policy: RetryPolicy) -> str:
    try:
        return download_file(sources, dest, checksum=HIGGS_SHA256, policy=policy)
    except FitscopeError:
        if source != "uci":
            raise
    # The current UCI page serves a zip that holds HIGGS.csv.gz.
    archive = dest.with_name("higgs.zip")
    used = download_file([HIGGS_ZIP_URL], archive, policy=policy)
    extract_zip_member(archive, HIGGS_FILE, dest)
    archive.unlink()
    if sha256_file(dest) != HIGGS_SHA256.partition(":")[2]:
        dest.unlink()
        raise FitscopeError(f"{HIGGS_FILE} inside {used} fails its sha256 check. Fix: retry later")
    return used


def fill_mirror(
    out_dir: str | os.PathLike[str],
    datasets: tuple[str, ...] = ("higgs", "mnist"),
    policy: RetryPolicy = DEFAULT_RETRY,
) -> list[Path]:
    """Download the official, checksummed upstream files into a mirror directory."""
    out_dir = Path(out_dir)
    written = []
    if "higgs" in datasets:
        _fetch_higgs_full(list(HIGGS_URLS), out_dir / HIGGS_FILE, "uci", policy)
        written.append(out_dir / HIGGS_FILE)
    if "mnist" in datasets:
        for name, md5 in MNIST_FILES.items():
            download_file(
                [_join(base, name) for base in MNIST_MIRRORS],
                out_dir / name,
                checksum=f"md5:{md5}",
                policy=policy,
            )
            written.append(out_dir / name)
    return written


def _open_gzip_text(path: Path):
    return igzip.open(path, "rb")


def _locate_csv_problem(path: Path, n_columns: int) -> str:
    """Find the first malformed line (slow path, only after the fast parser failed)."""
    with _open_gzip_text(path) as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", "replace").strip()
            if not line:
                continue
            cells = line.split(",")
            if len(cells) != n_columns:
                return f"{path}:{lineno}: expected {n_columns} columns, found {len(cells)}"
            for col, cell in enumerate(cells, start=1):
                try:
                    float(cell)
                except ValueError:
                    return f"{path}:{lineno}: column {col} is not a number ({cell[:20]!r})"
    return f"{path}: unparseable CSV"


def read_higgs_csv(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Parse a HIGGS CSV(.gz): returns float32 features (n, 28) and int64 labels (n,)."""
    path = Path(path)
    names = [f"c{i}" for i in range(HIGGS_COLUMNS)]
    try:
        with _open_gzip_text(path) as fh:
            table = pacsv.read_csv(
                io.BufferedReader(fh, 1 << 20),
                read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.float32())
                ),
            )
    except (EOFError, OSError) as exc:  # truncated or non-gzip input
        raise FitscopeError(
            f"{path} is not a complete gzip file ({exc}). Fix: delete it and run `dvc repro` again"
        ) from exc
    except pa.ArrowInvalid as exc:
        raise FitscopeError(
            f"{_locate_csv_problem(path, HIGGS_COLUMNS)}. Fix: the file is corrupt or not HIGGS; "
            "re-download it or check the mirror"
        ) from exc
    data = np.column_stack([table.column(i).to_numpy() for i in range(HIGGS_COLUMNS)])
    labels = data[:, 0]
    if not np.isin(labels, (0.0, 1.0)).all():
        bad = int(np.flatnonzero(~np.isin(labels, (0.0, 1.0)))[0]) + 1
        raise FitscopeError(f"{path}:{bad}: label must be 0 or 1. Fix: the file is not HIGGS")
    return np.ascontiguousarray(data[:, 1:], dtype=np.float32), labels.astype(np.int64)


def split_higgs(
    params: HiggsParams, raw_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]
) -> dict[str, Any]:
    """Validation = first rows, test = last rows, training = the rows in between."""
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    raw = raw_dir / HIGGS_FILE
    x, y = read_higgs_csv(raw)
    n = len(y)
    n_val, n_test = params.val_rows, params.resolved_test_rows()
    n_train = params.resolved_train_rows()
    if n_train is None:
        n_train = n - n_val - n_test
    if n_train < 1 or n_val + n_train + n_test > n:
        raise FitscopeError(
            f"the HIGGS split asks for {n_val} validation + {n_train} training + {n_test} test "
            f"rows but {raw} has {n}. Fix: lower data.higgs sizes in params.yaml or use a "
            "larger source"
        )
    bounds = {"val": (0, n_val), "train": (n_val, n_val + n_train), "test": (n - n_test, n)}
    splits = {name: (x[a:b], y[a:b], a) for name, (a, b) in bounds.items()}
    return _write_splits("higgs", splits, raw_dir, out_dir, params=asdict(params))


# --- MNIST -------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike[str], *, ndim: int) -> np.ndarray:
    """Parse a gzip IDX file of unsigned bytes, validating magic number and sizes."""
    path = Path(path)
    try:
        with igzip.open(path, "rb") as fh:
            raw = fh.read()
    except (EOFError, OSError) as exc:
        raise FitscopeError(
            f"{path} is not a complete gzip file ({exc}). Fix: delete it and fetch it again"
        ) from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise FitscopeError(
            f"{path} has a bad IDX magic number {raw[:4].hex() or 'empty'} (expected "
            f"000008{ndim:02x}). Fix: the file is corrupt or not MNIST; fetch it again"
        )
    dims = struct.unpack(f">{ndim}i", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise FitscopeError(
            f"{path} declares dimensions {dims} ({expected} bytes) but holds "
            f"{len(raw) - header} bytes. Fix: the file is truncated or corrupt; fetch it again"
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
        bases = (
            MNIST_MIRRORS
            if params.source == "official"
            else [_mirror_base("data.mnist", params.mirror)]
        )
        for name, md5 in MNIST_FILES.items():
            sources = [_join(base, name) for base in bases]
            used[name] = download_file(
                sources, out_dir / name, checksum=f"md5:{md5}", policy=policy
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
            f"{len(labels)} labels (expected 28x28 and equal counts). Fix: fetch the files again"
        )
    if labels.max(initial=0) > 9:
        raise FitscopeError(f"{raw_dir}/{prefix}-labels: labels above 9. Fix: fetch it again")
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
    return _write_splits("mnist", splits, raw_dir, out_dir, params=asdict(params))


# --- shared split writer -------------------------------------------------------------------------
def _write_splits(
    dataset: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray, int | None]],
    raw_dir: Path,
    out_dir: Path,
    params: dict[str, Any],
) -> dict[str, Any]:
    inputs = {
        p.name: sha256_file(p)
        for p in sorted(raw_dir.iterdir())
        if p.is_file() and not p.name.endswith((".part", ".tmp"))
    }
    manifest: dict[str, Any] = {
        "dataset": dataset,
        "params": params,
        "inputs_sha256": inputs,
        "splits": {},
    }
    source_json = raw_dir / "source.json"
    if source_json.exists():
        manifest["source"] = json.loads(source_json.read_text())
    for name, (x, y, first_row) in splits.items():
        write_npy(out_dir / f"{name}_x.npy", x)
        write_npy(out_dir / f"{name}_y.npy", y)
        classes, counts = np.unique(y, return_counts=True)
        entry: dict[str, Any] = {
            "rows": len(y),
            "features": int(x.shape[1]),
            "class_counts": {str(int(c)): int(k) for c, k in zip(classes, counts, strict=True)},
        }
        if first_row is not None:
            entry["first_row"] = first_row
        manifest["splits"][name] = entry
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def load_split(data_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one split written by ``split_higgs``/``split_mnist``."""
    data_dir = Path(data_dir)
    x_path, y_path = data_dir / f"{split}_x.npy", data_dir / f"{split}_y.npy"
    if not x_path.exists() or not y_path.exists():
        raise FitscopeError(
            f"no {split} split in {data_dir}. Fix: run the data stages first (`dvc repro split`)"
        )
    return np.load(x_path, mmap_mode="r"), np.load(y_path, mmap_mode="r")
