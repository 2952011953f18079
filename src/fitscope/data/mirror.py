"""``fitscope mirror``: filling a local mirror of the official files and publishing its
checksums.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import sha256_file, write_json
from fitscope.data import official
from fitscope.data.download import DEFAULT_RETRY, RetryPolicy, download_file, local_path
from fitscope.data.gzip_stream import gzip_line_blocks
from fitscope.data.higgs import fetch_higgs_full
from fitscope.data.official import (
    BLOCK_LINES,
    CHECKSUMS_FILE,
    DEFAULT_MIRROR_DIR,
    HIGGS_FILE,
    MIRROR_ENV,
    join_url,
)
from fitscope.data.params import higgs_params, mnist_params


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
        fetch_higgs_full(list(official.HIGGS_URLS), out_dir / HIGGS_FILE, "uci", policy)
        written.append(out_dir / HIGGS_FILE)
    if "mnist" in datasets:
        for name, md5 in official.MNIST_FILES.items():
            download_file(
                [join_url(base, name) for base in official.MNIST_MIRRORS],
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
    for name in (HIGGS_FILE, *official.MNIST_FILES):
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
            f"{mirror_dir} holds none of {HIGGS_FILE}, {', '.join(official.MNIST_FILES)}. "
            "Fix: fill it "
            "with `fitscope mirror` (or copy the official files there first)"
        )
    write_json(path, {"format": 1, "files": files})
    return path
