"""HIGGS: fetching the rows the study needs (embedded sample, UCI or a mirror, verified
before anything is written) and splitting the CSV into validation, train and test.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import NpyAppender, sha256_file, write_json
from fitscope.data import official
from fitscope.data.download import DEFAULT_RETRY, RetryPolicy, download_file
from fitscope.data.gzip_stream import extract_zip_member, fetch_gzip_head
from fitscope.data.higgs_csv import higgs_blocks, higgs_rows_problem
from fitscope.data.official import (
    CHECKSUMS_FILE,
    HIGGS_COLUMNS,
    HIGGS_EMBEDDED,
    HIGGS_EMBEDDED_SHA256,
    HIGGS_FILE,
    HIGGS_ZIP_URL,
    SHA256_HEX,
    copy_embedded,
    join_url,
    mirror_base,
    mirror_higgs_entry,
    mirror_line_blocks,
)
from fitscope.data.params import HiggsParams
from fitscope.data.splits import require_raw, write_manifest


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
        copy_embedded(HIGGS_EMBEDDED, HIGGS_EMBEDDED_SHA256, dest)
        used = f"embedded:{HIGGS_EMBEDDED}"
    else:
        base = None if params.source == "uci" else mirror_base("data.higgs", params.mirror)
        sources = list(official.HIGGS_URLS) if base is None else [join_url(base, HIGGS_FILE)]
        if params.streams_head:
            used, extra = _fetch_higgs_head(params, sources, base, dest, policy)
        else:
            checksum, verified_by = _full_file_checksum(params, base, policy)
            used = fetch_higgs_full(sources, dest, params.source, policy, checksum)
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
    return official.HIGGS_SHA256, "published sha256"


def fetch_higgs_full(
    sources: list[str],
    dest: Path,
    source: str,
    policy: RetryPolicy,
    checksum: str | None = None,  # None: the published sha256
) -> str:
    checksum = checksum or official.HIGGS_SHA256
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
    digest: dict[str, str] = {}
    require_raw(raw, "higgs")
    created = not out_dir.exists()
    done = False
    writers: dict[str, _SplitWriter] = {}
    try:
        writers.update({name: _SplitWriter(out_dir, name) for name in ("val", "train", "test")})
        total = _stream_into(writers, params, raw, on_bytes, digest)
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
    n_val, n_test = params.val_rows, params.resolved_test_rows()
    first_rows = {"val": 0, "train": n_val, "test": total - n_test}
    return write_manifest(
        "higgs", first_rows, raw_dir, out_dir, asdict(params), {HIGGS_FILE: digest["file"]}
    )


class _TailQueue:
    """The last ``size`` rows seen (the test split's candidates); :meth:`push` yields the
    rows a new block pushes out of it."""

    def __init__(self, size: int) -> None:
        self.size, self.rows = size, 0
        self.blocks: deque[np.ndarray] = deque()

    def push(self, block: np.ndarray) -> Iterator[np.ndarray]:
        self.blocks.append(block)
        self.rows += len(block)
        while self.rows > self.size:
            oldest = self.blocks[0]
            out = min(len(oldest), self.rows - self.size)
            yield oldest[:out]
            if out == len(oldest):
                self.blocks.popleft()
            else:
                self.blocks[0] = oldest[out:]
            self.rows -= out


def _stream_into(
    writers: dict[str, _SplitWriter],
    params: HiggsParams,
    raw: Path,
    on_bytes: Callable[[int], None] | None,
    digest: dict[str, str],
) -> int:
    """Parse ``raw`` once into the three writers; the number of rows it holds."""
    n_val, n_test = params.val_rows, params.resolved_test_rows()
    n_train = params.resolved_train_rows()
    want_train = n_train if n_train is not None else math.inf
    tail, total = _TailQueue(n_test), 0
    for first, block in higgs_blocks(raw, on_bytes, digest):
        total = first + len(block)
        if first < n_val:
            take = min(n_val - first, len(block))
            writers["val"].append(block[:take])
            block = block[take:]
        for pushed in tail.push(block):  # rows pushed out of the test queue
            room = want_train - writers["train"].rows
            if room > 0:
                writers["train"].append(pushed[: int(min(len(pushed), room))])
    if writers["val"].rows < n_val or tail.rows < n_test or writers["train"].rows < (n_train or 1):
        raise FitscopeError(
            f"the HIGGS split asks for {n_val} validation + {n_train or 'at least 1'} "
            f"training + {n_test} test rows but {raw} has {total}. Fix: lower data.higgs sizes "
            "in params.yaml or use a larger source"
        )
    for block in tail.blocks:
        writers["test"].append(block)
    return total
