"""Parsing and checking HIGGS CSV text: 29 finite numeric columns and 0/1 labels, read in
blocks so memory does not grow with the file; a bad row is named by its line.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from isal import igzip, isal_zlib

from fitscope.core.errors import FitscopeError
from fitscope.data import official
from fitscope.data.official import HIGGS_COLUMNS
from fitscope.data.splits import require_raw

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

    About ``official.HIGGS_BLOCK_BYTES`` of text at a time, so memory does not grow with the file.
    Every row is checked (29 numbers, finite, label 0/1) and the gzip stream must be
    complete: a bad file raises a one-line FitscopeError naming the line, possibly after
    earlier blocks were yielded (callers write nothing final until the stream ends).
    ``on_bytes(n)`` is called with each compressed block read; when the stream is done,
    ``sha256["file"]`` holds the sha256 of the file's bytes (hashed while they were read).
    """
    path = Path(path)
    require_raw(path, "higgs")
    fix = "Fix: fetch it again with `dvc repro -f -s fetch_higgs`"
    row = 0
    try:
        with open(path, "rb") as raw:
            reader = _HashingReader(raw, on_bytes)
            with igzip.IGzipFile(fileobj=reader, mode="rb") as fh:  # type: ignore[arg-type]
                while text := fh.read(official.HIGGS_BLOCK_BYTES):
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
