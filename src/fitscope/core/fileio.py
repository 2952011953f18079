"""Crash-safe file writes: readers never see a half-written file."""

from __future__ import annotations

import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from isal import igzip

from fitscope.core.errors import FitscopeError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; outputs are shared
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        if _out_of_space(exc, path.parent):
            raise FitscopeError(
                f"no space left on the device while writing {path}. Fix: free space there "
                "(or write elsewhere, e.g. paths.run_dir=...) and run the same command again"
            ) from None
        raise
    finally:
        tmp_path.unlink(missing_ok=True)


def _out_of_space(exc: BaseException, directory: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    try:  # (before the partial file is removed) is the filesystem full?
        return shutil.disk_usage(directory).free < (1 << 16)
    except OSError:
        return False


def check_writable_dir(
    directory: str | os.PathLike[str], what: str, *, create: bool = True
) -> None:
    """Check that files can be written in ``directory`` (config key ``what``), with a probe
    file; one-line error if they cannot. ``create``: make the directory (else the probe goes
    to its nearest existing ancestor, and nothing is created)."""
    directory = Path(directory)
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        probed = directory
        while not create and not probed.exists() and probed != probed.parent:
            probed = probed.parent
        if not probed.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, f"{probed} is not a directory")
        fd, probe = tempfile.mkstemp(prefix=".write-probe.", dir=probed)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FitscopeError(
            f"cannot write to {what}={directory} ({exc.strerror or exc}). Fix: make it "
            f"writable or set {what} to a writable directory"
        ) from None


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike[str], rows: Iterable[Sequence[Any]]) -> None:
    """Write ``rows`` (a header row first, where there is one) as CSV, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def read_float_csv(path: str | os.PathLike[str]) -> list[dict[str, float]]:
    """The rows of a CSV with a header row, every value as a float (history.csv, curves)."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save an array as ``.npy`` (memory-mappable), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_gzip(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` gzip-compressed, atomically and byte-for-byte reproducibly (mtime 0)."""
    with (
        atomic_path(path) as tmp,
        open(tmp, "wb") as raw,
        igzip.IGzipFile(filename="", fileobj=raw, mode="wb", compresslevel=2, mtime=0) as fh,
    ):
        fh.write(data)


class NpyAppender:
    """A ``.npy`` file written block by block (bounded memory), renamed into place by
    :meth:`commit`; :meth:`discard` removes an uncommitted one.

    The header is written first and rewritten with the final row count at the end; numpy
    pads ``.npy`` headers so that the row count can grow in place (same header length).
    """

    def __init__(self, path: str | os.PathLike[str], dtype: Any, width: int | None = None) -> None:
        self.path = Path(path)
        self.dtype, self.width, self.rows = np.dtype(dtype), width, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self.tmp: Path | None = Path(tmp)
        self.fh = os.fdopen(fd, "wb")
        self.header_bytes = self._write_header()

    def _shape(self) -> tuple[int, ...]:
        return (self.rows,) if self.width is None else (self.rows, self.width)

    def _write_header(self) -> int:
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": self._shape(),
        }
        start = self.fh.tell()
        np.lib.format.write_array_header_1_0(self.fh, header)
        return self.fh.tell() - start

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self._shape()[1:]:
            raise ValueError(f"{self.path}: block of shape {block.shape}, rows of {self._shape()}")
        if block.size:
            self.fh.write(memoryview(block).cast("B"))
        self.rows += len(block)

    def commit(self) -> None:
        """Write the final header, sync and rename the file into place."""
        assert self.tmp is not None, "committed twice"
        self.fh.seek(0)
        if self._write_header() != self.header_bytes:  # numpy's padding makes this impossible
            raise RuntimeError(f"{self.path}: the .npy header changed length")
        self.fh.close()
        os.chmod(self.tmp, 0o666 & ~_UMASK)
        os.replace(self.tmp, self.path)
        self.tmp = None

    def discard(self) -> None:
        """Remove the file unless it was committed (safe to call always)."""
        if self.tmp is not None:
            self.fh.close()
            self.tmp.unlink(missing_ok=True)
            self.tmp = None
