"""The split arrays on disk: written with their manifest, and loaded only after the
manifest verifies them (feature count, dtype, labels, checksums).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import sha256_file, write_json, write_npy
from fitscope.data.official import NUM_CLASSES


# --- shared split writer and verified loader ---------------------------------------------------
def write_splits(
    dataset: str,
    splits: dict[str, tuple[np.ndarray, np.ndarray, int | None]],
    raw_dir: Path,
    out_dir: Path,
    params: dict[str, Any],
) -> dict[str, Any]:
    """Write in-memory split arrays, then their manifest."""
    for name, (x, y, _) in splits.items():
        write_npy(out_dir / f"{name}_x.npy", x)
        write_npy(out_dir / f"{name}_y.npy", y)
    first_rows = {name: first_row for name, (_, _, first_row) in splits.items()}
    return write_manifest(dataset, first_rows, raw_dir, out_dir, params)


def write_manifest(
    dataset: str,
    first_rows: dict[str, int | None],
    raw_dir: Path,
    out_dir: Path,
    params: dict[str, Any],
    inputs_sha256: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Describe the split files in ``out_dir`` in ``manifest.json`` (written last).

    ``inputs_sha256`` holds input hashes already taken while the input was read once.
    """
    known = inputs_sha256 or {}
    inputs = {
        p.name: known.get(p.name) or sha256_file(p)
        for p in sorted(raw_dir.iterdir())
        if p.is_file() and not p.name.endswith((".part", ".tmp"))
    }
    manifest: dict[str, Any] = {
        "dataset": dataset,
        "num_classes": NUM_CLASSES[dataset],
        "params": params,
        "inputs_sha256": inputs,
        "splits": {},
    }
    source_json = raw_dir / "source.json"
    if source_json.exists():
        manifest["source"] = json.loads(source_json.read_text())
    for name, first_row in first_rows.items():
        arrays = {
            part: np.load(out_dir / f"{name}_{part}.npy", mmap_mode="r") for part in ("x", "y")
        }
        x, y = arrays["x"], arrays["y"]
        counts = np.bincount(y, minlength=NUM_CLASSES[dataset])  # labels were verified
        entry: dict[str, Any] = {
            "rows": len(y),
            "features": int(x.shape[1]),
            "class_counts": {str(c): int(k) for c, k in enumerate(counts) if k},
            "arrays": {},
        }
        if first_row is not None:
            entry["first_row"] = first_row
        for part, array in arrays.items():
            path = out_dir / f"{name}_{part}.npy"
            # What the loader checks the file against: shape, dtype and every byte.
            entry["arrays"][part] = {
                "file": path.name,
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "sha256": sha256_file(path),
            }
        manifest["splits"][name] = entry
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def read_manifest(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``manifest.json`` of a split directory (written last by the split stage)."""
    data_dir = Path(data_dir)
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise FitscopeError(
            f"no data split in {data_dir} (no manifest.json). Fix: run the data stages first "
            "(`dvc repro split_higgs split_mnist`)"
        )
    fix = f"Fix: rebuild the split with `dvc repro -f -s split_{data_dir.name}`"
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise FitscopeError(f"{path} is not valid JSON ({exc}). {fix}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise FitscopeError(f"{path} is not a split manifest (no 'splits'). {fix}")
    if manifest.get("dataset") not in NUM_CLASSES or "num_classes" not in manifest:
        raise FitscopeError(
            f"{path} names no known dataset or no label range (written by an older fitscope "
            f"or damaged). {fix}"
        )
    disagreement = _splits_disagree(manifest)
    if disagreement:
        raise FitscopeError(f"the splits in {data_dir} disagree: {disagreement}. {fix}")
    return manifest


def _splits_disagree(manifest: dict[str, Any]) -> str | None:
    """Whether the splits' arrays differ in what a model sees (features per row, feature
    and label dtypes), from their manifest entries; each array is checked against its
    entry, and its labels against ``num_classes``, when it is loaded (load_split)."""
    kinds: dict[tuple, list[str]] = {}
    for name, entry in sorted(manifest["splits"].items()):
        try:
            x, y = entry["arrays"]["x"], entry["arrays"]["y"]
            kind = (tuple(x["shape"][1:]), str(x["dtype"]), str(y["dtype"]))
        except (KeyError, TypeError):
            continue  # an entry without arrays is refused when its split is loaded
        kinds.setdefault(kind, []).append(name)
    if len(kinds) < 2:
        return None
    return "; ".join(
        f"{', '.join(names)}: {'x'.join(map(str, shape)) or 'scalar'} features of {x}, labels {y}"
        for (shape, x, y), names in kinds.items()
    )


def load_split(data_dir: str | os.PathLike[str], split: str) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map one split, verified against ``manifest.json`` before anyone trains on it.

    Checked: the ``.npy`` files parse, their shape and dtype are the recorded ones, x and
    y agree in length, every feature is finite, every label is in range, and every byte
    matches the recorded sha256 (for 11M HIGGS rows that hash takes seconds; the check
    lives here only, so it is easy to cache if that ever matters).
    """
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    dataset = manifest["dataset"]
    fix = f"Fix: rebuild the split with `dvc repro -f -s split_{dataset}`"
    entry = manifest["splits"].get(split)
    if not isinstance(entry, dict) or "arrays" not in entry:
        raise FitscopeError(
            f"{data_dir}/manifest.json has no verifiable {split} split (written by an older "
            f"fitscope or damaged). {fix}"
        )
    x = _load_array(data_dir, entry["arrays"].get("x"), fix)
    y = _load_array(data_dir, entry["arrays"].get("y"), fix)
    x_path, y_path = data_dir / f"{split}_x.npy", data_dir / f"{split}_y.npy"
    problem = _split_problem(x, y, manifest["num_classes"], x_path, y_path)
    if problem:
        raise FitscopeError(f"{problem}. {fix}")
    for part, path in (("x", x_path), ("y", y_path)):
        # Last: a changed byte that kept the values plausible still shows up here.
        if sha256_file(path) != entry["arrays"][part]["sha256"]:
            raise FitscopeError(
                f"{path} differs from the sha256 in manifest.json (it changed after the split "
                f"stage wrote it). {fix}"
            )
    return x, y


def _load_array(data_dir: Path, spec: Any, fix: str) -> np.ndarray:
    """Memory-map one array and check its shape and dtype against its manifest entry."""
    try:
        path = data_dir / spec["file"]
        shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FitscopeError(f"{data_dir}/manifest.json has a damaged array entry. {fix}") from exc
    if not path.is_file():
        raise FitscopeError(f"{path} not found. {fix}")
    if path.stat().st_size == 0:
        raise FitscopeError(f"{path} is empty. {fix}")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises many types for a damaged header or body
        raise FitscopeError(
            f"{path} is not a valid .npy file ({type(exc).__name__}: {exc}). {fix}"
        ) from exc
    if not isinstance(array, np.ndarray):  # e.g. an .npz archive under the .npy name
        raise FitscopeError(f"{path} is not a .npy array file. {fix}")
    if array.shape != shape or array.dtype != dtype:
        raise FitscopeError(
            f"{path} holds {array.dtype} {array.shape} but manifest.json records {dtype} "
            f"{shape}. {fix}"
        )
    return array


def _split_problem(
    x: np.ndarray, y: np.ndarray, num_classes: int, x_path: Path, y_path: Path
) -> str | None:
    """What makes a split unusable for training, or ``None``."""
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0:
        return f"{x_path} {x.shape} and {y_path} {y.shape} are not one row of features per label"
    if not np.issubdtype(x.dtype, np.floating) or not np.issubdtype(y.dtype, np.integer):
        return f"{x_path} ({x.dtype}) must hold floats and {y_path} ({y.dtype}) integers"
    step = max(1, (1 << 26) // max(1, x.shape[1] * x.itemsize))  # ~64 MB of rows at a time
    for start in range(0, len(x), step):
        finite = np.isfinite(x[start : start + step])
        if not finite.all():
            row, col = np.argwhere(~finite)[0]
            bad = int((~finite).sum())
            return (
                f"{x_path} holds non-finite features (NaN or Inf; {bad} in rows {start}-"
                f"{start + len(finite) - 1}, the first at row {start + row}, column {col})"
            )
    outside = (y < 0) | (y >= num_classes)
    if outside.any():
        row = int(np.flatnonzero(outside)[0])
        return f"{y_path} holds label {int(y[row])} at row {row}, outside 0..{num_classes - 1}"
    return None


def require_raw(path: Path, dataset: str) -> None:
    """A split stage input must exist and hold bytes (the fetch stage writes it)."""
    if not path.is_file():
        raise FitscopeError(f"{path} not found. Fix: run `dvc repro fetch_{dataset}`")
    if path.stat().st_size == 0:
        raise FitscopeError(
            f"{path} is empty. Fix: fetch it again with `dvc repro -f -s fetch_{dataset}`"
        )
