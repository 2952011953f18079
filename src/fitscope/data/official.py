"""Where the data comes from: the official URLs and checksums, the embedded samples, and
the checksums a mirror publishes. Tests point the official tables at a local server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import atomic_path, sha256_file
from fitscope.data.download import DownloadFailed, RetryPolicy, download_file
from fitscope.data.gzip_stream import LineBlocks

log = logging.getLogger(__name__)
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


def mirror_base(section: str, mirror: str | None) -> str:
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


def join_url(base: str, name: str) -> str:
    if base.startswith(("http://", "https://", "file://")):
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def copy_embedded(name: str, sha256: str, dest: Path) -> None:
    with resources.as_file(resources.files("fitscope.resources") / name) as src:
        if sha256_file(src) != sha256:
            raise FitscopeError(
                f"the embedded {name} is corrupt (checksum mismatch). Fix: reinstall fitscope "
                "(`make clean install`) or restore the file from git"
            )
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def mirror_higgs_entry(base: str, policy: RetryPolicy) -> tuple[dict[str, Any] | None, str]:
    """The HIGGS entry of a mirror's ``checksums.json``, or ``None`` and why there is none."""
    with tempfile.TemporaryDirectory(prefix="fitscope-checksums-") as tmp:
        local = Path(tmp) / CHECKSUMS_FILE
        try:
            download_file([join_url(base, CHECKSUMS_FILE)], local, policy=policy)
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
