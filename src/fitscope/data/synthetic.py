"""A synthetic HIGGS.csv.gz of any size, in the real file's layout (tests and ``make bench``).

No header, the label first, then 21 low-level and 7 high-level features, every value a
float32 written with ``%.18e`` (like the official file). The rows are drawn with
replacement from a seeded pool of generated events, so 11M rows cost seconds of
formatting instead of minutes; the label depends on the features, so a model can learn
something from it. Never committed (``data/synthetic/`` is git-ignored).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from isal import igzip

from fitscope.core.fileio import atomic_path, sha256_file
from fitscope.data.splits import write_manifest

# Feature columns (0-based, after the label) by kind, as in the HIGGS paper's table.
MOMENTA = (0, 3, 5, 9, 13, 17)  # lepton pT, missing energy, jet pT: positive, skewed
ETAS = (1, 6, 10, 14, 18)
PHIS = (2, 4, 7, 11, 15, 19)
BTAGS = (8, 12, 16, 20)
MASSES = tuple(range(21, 28))  # the 7 high-level invariant masses
BTAG_VALUES = np.array([0.0, 1.086538076400756836, 2.173076152801513672], dtype=np.float32)
POOL_ROWS = 1 << 14
CHUNK_ROWS = 1 << 16  # rows formatted and compressed at a time (~48 MB of text)


def synthetic_events(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` float32 rows (label, 28 features) with HIGGS-like marginals; signal ~53%."""
    label = (rng.random(n) < 0.53).astype(np.float32)
    x = np.empty((n, 28), dtype=np.float32)
    shift = 0.25 * label[:, None]  # signal events: heavier masses, harder momenta
    x[:, MOMENTA] = rng.lognormal(0.0, 0.5, (n, len(MOMENTA))) * (1 + 0.3 * shift)
    x[:, ETAS] = rng.normal(0.0, 1.0, (n, len(ETAS)))
    x[:, PHIS] = rng.uniform(-1.74, 1.74, (n, len(PHIS)))
    x[:, BTAGS] = rng.choice(BTAG_VALUES, (n, len(BTAGS)))
    x[:, MASSES] = rng.lognormal(0.0, 0.3, (n, len(MASSES))) + shift
    return np.column_stack([label, x]).astype(np.float32)


def format_rows(rows: np.ndarray) -> list[bytes]:
    """Each row as one CSV line of ``%.18e`` values (the official file's format)."""
    return [(",".join(f"{v:.18e}" for v in row.tolist()) + "\n").encode() for row in rows]


def write_synthetic_higgs(
    path: str | os.PathLike[str], rows: int, *, seed: int = 0, level: int = 1
) -> str:
    """Write ``rows`` synthetic HIGGS events to ``path`` (gzip, atomically); return its sha256."""
    if rows < 1:
        raise ValueError("rows must be >= 1")
    rng = np.random.default_rng(seed)
    pool = format_rows(synthetic_events(min(rows, POOL_ROWS), rng))
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        igzip.IGzipFile(filename="", fileobj=raw, mode="wb", compresslevel=level, mtime=0) as fh,
    ):
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            if rows <= POOL_ROWS:  # small files: every pool row once, in order
                picks = range(start, start + n)
            else:
                picks = rng.integers(0, len(pool), n).tolist()
            fh.write(b"".join([pool[i] for i in picks]))
    return sha256_file(Path(path))


def write_synthetic_split(
    out_dir: str | os.PathLike[str],
    train_rows: int,
    *,
    val_rows: int = 1000,
    test_rows: int = 500_000,
    seed: int = 0,
) -> dict:
    """A processed HIGGS split (``*_x.npy``/``*_y.npy`` + manifest) of synthetic events,
    written straight to memory-mappable files without a CSV: the GPU throughput check
    (scripts/gpu_check.sh) trains on a full-size split on machines without the CSV stack.
    """

    out, raw = Path(out_dir), Path(out_dir) / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first_rows: dict[str, int | None] = {}
    first = 1
    for name, rows in (("val", val_rows), ("train", train_rows), ("test", test_rows)):
        x = np.lib.format.open_memmap(out / f"{name}_x.npy", "w+", np.float32, (rows, 28))
        y = np.lib.format.open_memmap(out / f"{name}_y.npy", "w+", np.int64, (rows,))
        for start in range(0, rows, CHUNK_ROWS):
            events = synthetic_events(min(CHUNK_ROWS, rows - start), rng)
            x[start : start + len(events)] = events[:, 1:]
            y[start : start + len(events)] = events[:, 0].astype(np.int64)
        x.flush(), y.flush()
        del x, y
        first_rows[name], first = first, first + rows
    params = {"source": "synthetic", "val_rows": val_rows, "test_rows": test_rows}
    return write_manifest("higgs", first_rows, raw, out, params)
