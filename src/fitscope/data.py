"""Acquire, parse, verify and split HIGGS and MNIST (the DVC data stages).

Raw files land in ``data/raw/<dataset>/``; splits land in
``data/processed/<dataset>/`` as memory-mappable ``.npy`` arrays plus a
``manifest.json`` that training runs are tagged with.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
from isal import igzip, isal_zlib

from fitscope.config import check_choice, check_number, from_mapping
from fitscope.download import (
    DEFAULT_RETRY,
    DownloadFailed,
    LineBlocks,
    RetryPolicy,
    check_source,
    download_file,
    extract_zip_member,
    fetch_gzip_head,
    gzip_line_blocks,
    local_path,
)
from fitscope.errors import FitscopeError
from fitscope.fileio import (
    NpyAppender,
    atomic_path,
    sha256_file,
    write_gzip,
    write_json,
    write_npy,
)

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
# Decompressed text parsed at a time (~22,000 rows): the split's memory does not grow with the
# file, and blocks this size cost polars no more CPU per row than whole-file parsing.
HIGGS_BLOCK_BYTES = 1 << 24

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
# Read by no code any more (DVC cannot see environment variables); named only to refuse it.
MIRROR_ENV = "FITSCOPE_MIRROR"
CHECKSUMS_FILE = "checksums.json"  # published by `fitscope mirror` next to the data files
DEFAULT_MIRROR_DIR = "data/mirror"  # tracked by data.dvc
BLOCK_LINES = 1000  # a mirror's HIGGS checksums cover blocks of this many decompressed lines
NUM_CLASSES = {"higgs": 2, "mnist": 10}
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

log = logging.getLogger(__name__)


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
    head_sha256: str | None = None  # pinned sha256 of the streamed rows' decompressed text
    sha256: str | None = None  # size=full: the whole file's sha256 (overrides the default)

    def __post_init__(self) -> None:
        check_choice("data.higgs.source", self.source, ("embedded", "uci", "mirror"))
        check_choice("data.higgs.size", self.size, ("study", "full"))
        check_mirror_param("data.higgs.mirror", self.mirror)
        for key in ("val_rows", "train_rows", "test_rows"):
            check_number(
                f"data.higgs.{key}",
                getattr(self, key),
                low=1,
                integer=True,
                allow_none=key != "val_rows",
            )
        for key in ("head_sha256", "sha256"):
            value = getattr(self, key)
            if value is not None and (
                not isinstance(value, str) or not SHA256_HEX.fullmatch(value)
            ):
                raise FitscopeError(
                    f"data.higgs.{key}={value!r} is not a sha256 (64 lowercase hex digits). Fix: "
                    "quote the value `fitscope fetch higgs` printed, or set it to null"
                )
        if self.sha256 is not None and (self.source == "embedded" or self.size != "full"):
            raise FitscopeError(
                f"data.higgs.sha256 pins a whole downloaded file, but source={self.source} "
                f"size={self.size} downloads none. Fix: set data.higgs.sha256 to null (or use "
                "size: full with source: uci or mirror)"
            )
        if self.head_sha256 is None:
            return
        if not self.streams_head:
            raise FitscopeError(
                "data.higgs.head_sha256 pins a streamed head, but source="
                f"{self.source} size={self.size} verifies the whole file by its own checksum. "
                "Fix: set data.higgs.head_sha256 to null"
            )

    @property
    def streams_head(self) -> bool:
        return self.source != "embedded" and self.size == "study"

    def resolved_test_rows(self) -> int:
        if self.test_rows is not None:
            return self.test_rows
        return 500_000 if (self.source != "embedded" and self.size == "full") else 1000

    def resolved_train_rows(self) -> int | None:
        """Training rows: the classic 10,000 for a streamed head; ``None`` = every row between
        validation and test (embedded, and the whole file with size=full)."""
        if self.train_rows is not None or not self.streams_head:
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
        check_mirror_param("data.mnist.mirror", self.mirror)
        check_number("data.mnist.val_size", self.val_size, low=1, integer=True)
        check_number("data.mnist.test_size", self.test_size, low=1, integer=True, allow_none=True)
        check_number("data.mnist.seed", self.seed, low=0, integer=True)


def higgs_params(data_section: dict[str, Any] | None) -> HiggsParams:
    return from_mapping(HiggsParams, "data.higgs", (data_section or {}).get("higgs"))


def mnist_params(data_section: dict[str, Any] | None) -> MnistParams:
    return from_mapping(MnistParams, "data.mnist", (data_section or {}).get("mnist"))


def check_mirror_param(key: str, mirror: Any) -> None:
    """A mirror is null, a local directory or an ``http(s)://``/``file://`` base URL."""
    if mirror is None:
        return
    if not isinstance(mirror, str) or not mirror:
        raise FitscopeError(
            f"{key}={mirror!r} is not a location. Fix: set it to a base URL or directory"
        )
    check_source(mirror)


def _mirror_base(section: str, mirror: str | None) -> str:
    """The mirror location: only the DVC parameter, so changing it re-runs the fetch."""
    env = os.environ.get(MIRROR_ENV)
    if not mirror:
        if env:
            raise FitscopeError(
                f"{section}.source=mirror reads the mirror from {section}.mirror only, not from "
                f"{MIRROR_ENV} (DVC cannot see environment variables, so a change would not "
                f"re-run the fetch). Fix: set {section}.mirror: {env} in params.yaml"
            )
        raise FitscopeError(
            f"{section}.source=mirror needs a location. Fix: set {section}.mirror in params.yaml "
            "to a base URL or directory"
        )
    if env and env != mirror:
        log.warning("%s is ignored: %s.mirror=%s is used", MIRROR_ENV, section, mirror)
    return mirror


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
    """Put the HIGGS rows the study needs into ``out_dir/HIGGS.csv.gz``; return its provenance.

    Everything is verified before the file is written (so DVC never caches a bad output):
    a streamed head against the mirror's checksums and ``data.higgs.head_sha256`` when
    available, and always row by row (29 numeric, finite columns, labels 0/1).
    """
    out_dir = Path(out_dir)
    dest = out_dir / HIGGS_FILE
    extra: dict[str, Any] = {}
    if params.source == "embedded":
        _copy_embedded(HIGGS_EMBEDDED, HIGGS_EMBEDDED_SHA256, dest)
        used = f"embedded:{HIGGS_EMBEDDED}"
    else:
        base = None if params.source == "uci" else _mirror_base("data.higgs", params.mirror)
        sources = list(HIGGS_URLS) if base is None else [_join(base, HIGGS_FILE)]
        if params.streams_head:
            used, extra = _fetch_higgs_head(params, sources, base, dest, policy)
        else:
            checksum, verified_by = _full_file_checksum(params, base, policy)
            used = _fetch_higgs_full(sources, dest, params.source, policy, checksum)
            extra = {"verified_by": [verified_by]}
    info = {
        "dataset": "higgs",
        "source": params.source,
        "size": params.size,
        "url": used,
        "file": HIGGS_FILE,
        "sha256": sha256_file(dest),
        **extra,
    }
    write_json(out_dir / "source.json", info)
    return info


def _fetch_higgs_head(
    params: HiggsParams, sources: list[str], base: str | None, dest: Path, policy: RetryPolicy
) -> tuple[str, dict[str, Any]]:
    """Stream and verify the head; return the source used and what goes into source.json."""
    n, pinned = params.head_rows(), params.head_sha256
    blocks, no_blocks = (None, "") if base is None else mirror_line_blocks(base, policy)

    def check(text: bytes, digest: str) -> str | None:
        if pinned and digest != pinned:
            return (
                f"its first {n} rows have sha256 {digest}, not the pinned data.higgs.head_sha256 "
                f"{pinned}: upstream changed or corrupted, or the split sizes changed (if the "
                f"change is expected, pin the new value: data.higgs.head_sha256: {digest})"
            )
        problem = higgs_rows_problem(text, "line ")
        if problem or base is None or blocks is not None or pinned:
            return problem
        return (
            f"{no_blocks}, so its first {n} rows (sha256 {digest}) cannot be verified (if you "
            f"trust this mirror, pin data.higgs.head_sha256: {digest}; or re-create it with "
            "`fitscope mirror`)"
        )

    fix = (
        "check the network, or use a mirror (data.higgs.source: mirror and data.higgs.mirror)"
        if base is None
        else "check data.higgs.mirror (`fitscope mirror` makes one, with its checksums)"
    )
    head = fetch_gzip_head(sources, dest, n, policy=policy, blocks=blocks, check=check, fix=fix)
    verified_by = [f"mirror {CHECKSUMS_FILE}"] if blocks is not None else []
    verified_by += ["data.higgs.head_sha256"] if pinned else []
    return head.source, {"rows": n, "head_sha256": head.sha256, "verified_by": verified_by}


def _full_file_checksum(
    params: HiggsParams, base: str | None, policy: RetryPolicy
) -> tuple[str, str]:
    """The sha256 the whole HIGGS file must have, and what vouches for it.

    ``data.higgs.sha256`` when set; else the sha256 a mirror's ``checksums.json`` lists
    (``fitscope mirror`` writes it; a synthetic file's mirror too); else the published one.
    """
    if params.sha256:
        return f"sha256:{params.sha256}", "data.higgs.sha256"
    if base is not None:
        entry, _ = mirror_higgs_entry(base, policy)
        digest = (entry or {}).get("sha256")
        if isinstance(digest, str) and SHA256_HEX.fullmatch(digest):
            return f"sha256:{digest}", f"mirror {CHECKSUMS_FILE}"
    return HIGGS_SHA256, "published sha256"


def _fetch_higgs_full(
    sources: list[str],
    dest: Path,
    source: str,
    policy: RetryPolicy,
    checksum: str | None = None,  # None: the published sha256
) -> str:
    checksum = checksum or HIGGS_SHA256
    fix = (
        "check the network, or use a mirror (data.higgs.source: mirror and data.higgs.mirror)"
        if source == "uci"
        else "check data.higgs.mirror (`fitscope mirror` makes one)"
    )
    try:
        return download_file(sources, dest, checksum=checksum, policy=policy, fix=fix)
    except FitscopeError:
        if source != "uci":
            raise
    # The current UCI page serves a zip that holds HIGGS.csv.gz.
    archive = dest.with_name("higgs.zip")
    used = download_file([HIGGS_ZIP_URL], archive, policy=policy, fix=fix)
    extract_zip_member(archive, HIGGS_FILE, dest)
    archive.unlink()
    if sha256_file(dest) != checksum.partition(":")[2]:
        dest.unlink()
        raise FitscopeError(f"{HIGGS_FILE} inside {used} fails its sha256 check. Fix: retry later")
    return used


# polars reads " 1.0" as a number; the format has no whitespace, so text holding some takes
# the slow path, which names the line. (Quotes: quote_char=None makes '"1.0"' a bad number.)
_NOT_IN_HIGGS = (b" ", b"\t")


class _BadText(Exception):
    """The fast parser refused the text (the slow path then finds the line)."""


def _higgs_table(text: bytes) -> np.ndarray:
    """Parse HIGGS CSV text into a float32 (n, 29) array (the fast path: polars)."""
    if not text:
        return np.empty((0, HIGGS_COLUMNS), dtype=np.float32)
    if any(byte in text for byte in _NOT_IN_HIGGS):
        raise _BadText("whitespace")
    import polars as pl  # here: only the stages that parse CSV pay its import

    schema = {f"c{i}": pl.Float32 for i in range(HIGGS_COLUMNS)}
    try:  # quote_char=None: no quoting to handle (10% less CPU)
        frame = pl.read_csv(text, has_header=False, schema=schema, quote_char=None)
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise _BadText(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from exc
    if frame.null_count().sum_horizontal().item():  # empty cells or empty lines
        raise _BadText("empty values")
    return frame.to_numpy()


def _locate_csv_problem(lines: Iterable[bytes], where: str, fallback: str, start: int = 1) -> str:
    """Find the first malformed line (slow path, only after the fast parser failed)."""
    for lineno, raw in enumerate(lines, start=start):
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line.strip():
            return f"{where}{lineno}: empty line"
        cells = line.split(",")
        if len(cells) != HIGGS_COLUMNS:
            return f"{where}{lineno}: expected {HIGGS_COLUMNS} columns, found {len(cells)}"
        for col, cell in enumerate(cells, start=1):
            try:
                value = float(cell)
            except ValueError:
                return f"{where}{lineno}: column {col} is not a number ({cell[:20]!r})"
            if cell != cell.strip() or "_" in cell:  # float() accepts these, the parser not
                return f"{where}{lineno}: column {col} is not a number ({cell[:20]!r})"
            if not math.isfinite(value):
                return f"{where}{lineno}: column {col} is not a finite number ({cell[:20]})"
    return f"{where.rstrip(': ')} is not valid CSV ({' '.join(fallback.split())[:120]})"


def _values_problem(data: np.ndarray, where: str, first_row: int = 0) -> str | None:
    """Rows, finite values and 0/1 labels of a parsed HIGGS table (rows from ``first_row``)."""
    if len(data) == 0:
        return f"{where.rstrip(': ')} holds no rows"
    finite = np.isfinite(data)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        return (
            f"{where}{first_row + row + 1}: column {col + 1} is not a finite number "
            f"({data[row, col]})"
        )
    bad = (data[:, 0] != 0.0) & (data[:, 0] != 1.0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        return f"{where}{first_row + row + 1}: label must be 0 or 1, found {data[row, 0]:g}"
    return None


def _text_lines(text: bytes) -> list[bytes]:
    lines = text.split(b"\n")
    if lines[-1] == b"":  # after the final newline
        lines.pop()
    return lines


def higgs_rows_problem(text: bytes, where: str = "line ") -> str | None:
    """What is wrong with HIGGS CSV text (``where`` prefixes line numbers), or ``None``."""
    try:
        data = _higgs_table(text)
    except _BadText as exc:
        return _locate_csv_problem(_text_lines(text), where, str(exc))
    return _values_problem(data, where)


# Errors a damaged gzip file raises while it is read.
_GZIP_ERRORS = (EOFError, OSError, isal_zlib.error)


def _require_raw(path: Path, dataset: str) -> None:
    """A split stage input must exist and hold bytes (the fetch stage writes it)."""
    if not path.is_file():
        raise FitscopeError(f"{path} not found. Fix: run `dvc repro fetch_{dataset}`")
    if path.stat().st_size == 0:
        raise FitscopeError(
            f"{path} is empty. Fix: fetch it again with `dvc repro -f -s fetch_{dataset}`"
        )


class _HashingReader:
    """A binary file read through once: its sha256 (a single pass) and progress (``on_bytes``)."""

    def __init__(self, fh: Any, on_bytes: Callable[[int], None] | None) -> None:
        self.fh, self.on_bytes, self.digest = fh, on_bytes, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        block = self.fh.read(size)
        self.digest.update(block)
        if self.on_bytes is not None and block:
            self.on_bytes(len(block))  # the call site for a progress reporter
        return block

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True


def higgs_blocks(
    path: str | os.PathLike[str],
    on_bytes: Callable[[int], None] | None = None,
    sha256: dict[str, str] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Stream a HIGGS CSV(.gz) as verified float32 (n, 29) blocks: ``(first row, rows)``.

    About ``HIGGS_BLOCK_BYTES`` of text at a time, so memory does not grow with the file.
    Every row is checked (29 numbers, finite, label 0/1) and the gzip stream must be
    complete: a bad file raises a one-line FitscopeError naming the line, possibly after
    earlier blocks were yielded (callers write nothing final until the stream ends).
    ``on_bytes(n)`` is called with each compressed block read; when the stream is done,
    ``sha256["file"]`` holds the sha256 of the file's bytes (hashed while they were read).
    """
    path = Path(path)
    _require_raw(path, "higgs")
    fix = "Fix: fetch it again with `dvc repro -f -s fetch_higgs`"
    row = 0
    try:
        with open(path, "rb") as raw:
            reader = _HashingReader(raw, on_bytes)
            with igzip.IGzipFile(fileobj=reader, mode="rb") as fh:  # type: ignore[arg-type]
                while text := fh.read(HIGGS_BLOCK_BYTES):
                    text += fh.readline()  # end the block at a line end
                    try:
                        block = _higgs_table(text)
                    except _BadText as exc:
                        where = f"{path}:"
                        problem = _locate_csv_problem(_text_lines(text), where, str(exc), row + 1)
                        raise FitscopeError(
                            f"{problem}. {fix} (the file is corrupt or not HIGGS)"
                        ) from exc
                    problem = _values_problem(block, f"{path}:", row)
                    if problem:
                        raise FitscopeError(f"{problem}. {fix} (the file is corrupt or not HIGGS)")
                    yield row, block
                    row += len(block)
            while reader.read(1 << 20):  # hash any bytes the gzip reader did not need
                pass
    except _GZIP_ERRORS as exc:
        raise FitscopeError(f"{path} is not a complete gzip file ({exc}). {fix}") from exc
    if row == 0:
        raise FitscopeError(f"{path} holds no rows. {fix} (the file is corrupt or not HIGGS)")
    if sha256 is not None:
        sha256["file"] = reader.digest.hexdigest()


def read_higgs_csv(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Parse a whole HIGGS CSV(.gz) in memory: float32 features (n, 28), int64 labels (n,)."""
    data = np.concatenate([block for _, block in higgs_blocks(path)])
    return np.ascontiguousarray(data[:, 1:]), data[:, 0].astype(np.int64)


class _SplitWriter:
    """Rows of one split, appended block by block to ``<name>_x.npy`` / ``<name>_y.npy``."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.x = NpyAppender(out_dir / f"{name}_x.npy", np.float32, HIGGS_COLUMNS - 1)
        self.y = NpyAppender(out_dir / f"{name}_y.npy", np.int64)

    def append(self, rows: np.ndarray) -> None:
        self.x.append(rows[:, 1:])
        self.y.append(rows[:, 0].astype(np.int64))

    @property
    def rows(self) -> int:
        return self.y.rows


def split_higgs(
    params: HiggsParams,
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    on_bytes: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Validation = first rows, test = last rows, training = the rows in between.

    One pass over the gzip file, any size (11M rows: the full HIGGS file), into
    memory-mappable ``.npy`` files, in bounded memory: validation and training rows are
    appended to their files as they are parsed; the last ``test_rows`` rows wait in a
    queue (the test split: 58 MB for 500,000 rows), and a row pushed out of it goes to
    training until that is full. The files are renamed into place only after the whole
    stream parsed and verified, then the manifest is written (last).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    raw = raw_dir / HIGGS_FILE
    n_val, n_test = params.val_rows, params.resolved_test_rows()
    n_train = params.resolved_train_rows()
    want_train = n_train if n_train is not None else math.inf
    tail: deque[np.ndarray] = deque()  # the last rows seen: the test split candidates
    in_tail = total = 0
    digest: dict[str, str] = {}
    _require_raw(raw, "higgs")
    created = not out_dir.exists()
    done = False
    writers: dict[str, _SplitWriter] = {}
    try:
        writers.update({name: _SplitWriter(out_dir, name) for name in ("val", "train", "test")})
        for first, block in higgs_blocks(raw, on_bytes, digest):
            total = first + len(block)
            if first < n_val:
                take = min(n_val - first, len(block))
                writers["val"].append(block[:take])
                block = block[take:]
            tail.append(block)
            in_tail += len(block)
            while in_tail > n_test:  # rows pushed out of the test queue
                oldest = tail[0]
                out = min(len(oldest), in_tail - n_test)
                room = want_train - writers["train"].rows
                if room > 0:
                    writers["train"].append(oldest[: int(min(out, room))])
                if out == len(oldest):
                    tail.popleft()
                else:
                    tail[0] = oldest[out:]
                in_tail -= out
        if (
            writers["val"].rows < n_val
            or in_tail < n_test
            or writers["train"].rows < (n_train or 1)
        ):
            raise FitscopeError(
                f"the HIGGS split asks for {n_val} validation + {n_train or 'at least 1'} "
                f"training + {n_test} test rows but {raw} has {total}. Fix: lower data.higgs sizes "
                "in params.yaml or use a larger source"
            )
        for block in tail:
            writers["test"].append(block)
        for writer in writers.values():
            writer.x.commit()
            writer.y.commit()
        done = True
    finally:
        for writer in writers.values():
            writer.x.discard()
            writer.y.discard()
        if created and not done and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a refused split leaves nothing behind
    first_rows = {"val": 0, "train": n_val, "test": total - n_test}
    return _write_manifest(
        "higgs", first_rows, raw_dir, out_dir, asdict(params), {HIGGS_FILE: digest["file"]}
    )


# --- MNIST -------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike[str], *, ndim: int) -> np.ndarray:
    """Parse a gzip IDX file of unsigned bytes, validating magic number and sizes."""
    path = Path(path)
    _require_raw(path, "mnist")
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
            bases = list(MNIST_MIRRORS)
            fix = "check the network, or use a mirror (data.mnist.source: mirror and .mirror)"
        else:
            bases = [_mirror_base("data.mnist", params.mirror)]
            fix = "check data.mnist.mirror (`fitscope mirror` makes one)"
        for name, md5 in MNIST_FILES.items():
            sources = [_join(base, name) for base in bases]
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
    return _write_splits("mnist", splits, raw_dir, out_dir, params=asdict(params))


# --- the mirror (`fitscope mirror`) ------------------------------------------------------------
def fill_mirror(
    out_dir: str | os.PathLike[str],
    datasets: tuple[str, ...] = ("higgs", "mnist"),
    policy: RetryPolicy = DEFAULT_RETRY,
) -> list[Path]:
    """Download the official, checksummed upstream files into a mirror directory.

    Then (re)write its ``checksums.json``, which the mirror source verifies against.
    """
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
                fix="check the network and retry",
            )
            written.append(out_dir / name)
    written.append(write_mirror_checksums(out_dir))
    return written


def mirror_targets(
    data_section: dict[str, Any] | None, datasets: tuple[str, ...], explicit: str | None
) -> dict[Path, tuple[str, ...]]:
    """Where `fitscope mirror` puts each dataset: ``explicit`` (``--dir``), else the
    dataset's ``mirror`` parameter when it is a local directory, else ``data/mirror``.

    So `fitscope mirror` fills the very directory the fetch stage will read.
    """
    env = os.environ.get(MIRROR_ENV)
    if explicit is None and env:
        keys = " and ".join(f"data.{name}.mirror" for name in datasets)
        raise FitscopeError(
            f"{MIRROR_ENV} is set, but fitscope reads mirror locations only from --dir and "
            f"{keys} (DVC cannot see environment variables). Fix: pass --dir {env} and set "
            f"{keys}: {env} in params.yaml"
        )
    targets: dict[Path, list[str]] = {}
    for name in datasets:
        where: str | Path | None = explicit
        if where is None:
            params = higgs_params(data_section) if name == "higgs" else mnist_params(data_section)
            where = DEFAULT_MIRROR_DIR if params.mirror is None else local_path(params.mirror)
            if where is None:
                raise FitscopeError(
                    f"data.{name}.mirror={params.mirror} is a URL, but `fitscope mirror` fills "
                    "a local directory. Fix: pass --dir DIR, then publish DIR at that URL"
                )
        targets.setdefault(Path(where), []).append(name)
    return {path: tuple(names) for path, names in targets.items()}


def write_mirror_checksums(mirror_dir: str | os.PathLike[str]) -> Path:
    """Write ``checksums.json`` for the data files in ``mirror_dir``.

    Every file gets its sha256 and size; HIGGS also the sha256 of every 1,000-line block
    of its decompressed text, so that a streamed head of any length can be verified.
    Entries of unchanged files are reused (hashing 8 GB of text takes a minute).
    """
    mirror_dir = Path(mirror_dir)
    path = mirror_dir / CHECKSUMS_FILE
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text()).get("files", {})
        except (ValueError, AttributeError):
            old = {}
    files: dict[str, Any] = {}
    for name in (HIGGS_FILE, *MNIST_FILES):
        file = mirror_dir / name
        if not file.is_file():
            continue
        entry: dict[str, Any] = {"sha256": sha256_file(file), "bytes": file.stat().st_size}
        if name == HIGGS_FILE:
            previous = old.get(name) or {}
            if {k: previous.get(k) for k in entry} == entry and "block_sha256" in previous:
                entry = previous
            else:
                blocks = gzip_line_blocks(file, BLOCK_LINES)
                entry.update(
                    lines=blocks.lines, block_lines=blocks.size, block_sha256=list(blocks.sha256)
                )
        files[name] = entry
    if not files:
        raise FitscopeError(
            f"{mirror_dir} holds none of {HIGGS_FILE}, {', '.join(MNIST_FILES)}. Fix: fill it "
            "with `fitscope mirror` (or copy the official files there first)"
        )
    write_json(path, {"format": 1, "files": files})
    return path


def mirror_higgs_entry(base: str, policy: RetryPolicy) -> tuple[dict[str, Any] | None, str]:
    """The HIGGS entry of a mirror's ``checksums.json``, or ``None`` and why there is none."""
    with tempfile.TemporaryDirectory(prefix="fitscope-checksums-") as tmp:
        local = Path(tmp) / CHECKSUMS_FILE
        try:
            download_file([_join(base, CHECKSUMS_FILE)], local, policy=policy)
        except DownloadFailed as exc:
            return None, f"no usable {CHECKSUMS_FILE} ({'; '.join(exc.problems)})"
        try:
            entry = json.loads(local.read_bytes())["files"][HIGGS_FILE]
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"no usable {CHECKSUMS_FILE} ({type(exc).__name__}: {exc})"
    if not isinstance(entry, dict):
        return None, f"no usable {CHECKSUMS_FILE} (its {HIGGS_FILE} entry is not a mapping)"
    return entry, ""


def mirror_line_blocks(base: str, policy: RetryPolicy) -> tuple[LineBlocks | None, str]:
    """The HIGGS block checksums a mirror publishes, or ``None`` and why there are none."""
    entry, why = mirror_higgs_entry(base, policy)
    if entry is None:
        return None, why
    try:
        blocks = LineBlocks(
            int(entry["block_lines"]), int(entry["lines"]), tuple(entry["block_sha256"])
        )
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"no usable {CHECKSUMS_FILE} ({type(exc).__name__}: {exc})"
    return blocks, ""


# --- shared split writer and verified loader ---------------------------------------------------
def _write_splits(
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
    return _write_manifest(dataset, first_rows, raw_dir, out_dir, params)


def _write_manifest(
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
    return manifest


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
