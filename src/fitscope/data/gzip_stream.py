"""Streaming the head of a remote gzip file (only the rows a study needs), verifying it
line block by line block, and extracting a member of a zip archive.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from isal import isal_zlib

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import atomic_path, write_gzip
from fitscope.data.download import (
    CHUNK,
    DEFAULT_FIX,
    DEFAULT_RETRY,
    GZIP_MAGIC,
    RetryPolicy,
    SourceFailed,
    check_source,
    download_failed,
    http_get,
    local_path,
    response_body,
    with_retries,
)


# --- streamed gzip heads -----------------------------------------------------------------------
def _gzip_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a (multi-member) gzip byte stream and yield its lines (without ``\\n``).

    Bad content raises ``SourceFailed``: it is the source's fault, so the next one is tried.
    """
    decomp = isal_zlib.decompressobj(wbits=31)
    pending = b""
    received = 0
    for chunk in chunks:
        if not received and chunk and not GZIP_MAGIC.startswith(chunk[:2]):
            raise SourceFailed(f"is not gzip (it starts with {chunk[:16]!r})")
        received += len(chunk)
        while chunk:
            if decomp.eof:  # the next member of a multi-member file
                decomp = isal_zlib.decompressobj(wbits=31)
            try:
                data = decomp.decompress(chunk)
            except isal_zlib.error as exc:
                raise SourceFailed(f"is corrupt gzip ({exc})") from exc
            chunk = decomp.unused_data if decomp.eof else b""
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            yield from lines
    if not received:
        raise SourceFailed("is empty")
    if not decomp.eof:
        raise SourceFailed("is a truncated gzip stream")
    if pending:
        yield pending


def _local_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            yield block


def lines_text(lines: Sequence[bytes]) -> bytes:
    """The text of ``lines``, each ended by ``\\n`` (what head and block checksums cover)."""
    return b"".join(line + b"\n" for line in lines)


@dataclass(frozen=True)
class LineBlocks:
    """sha256 of every ``size``-line block of a gzip file's decompressed text.

    A mirror publishes these so that a head of any length can be verified: the head's
    blocks (the last one read to its end) must match.
    """

    size: int
    lines: int  # lines in the whole file
    sha256: tuple[str, ...]

    def __post_init__(self) -> None:
        if self.size < 1 or len(self.sha256) != math.ceil(self.lines / self.size):
            raise ValueError(
                f"{len(self.sha256)} block checksums do not cover {self.lines} lines "
                f"in blocks of {self.size}"
            )


def gzip_line_blocks(path: str | os.PathLike[str], size: int = 1000) -> LineBlocks:
    """Block checksums of a local gzip text file (what ``fitscope mirror`` publishes)."""
    digests: list[str] = []
    block, lines = hashlib.sha256(), 0
    try:
        for line in _gzip_lines(_local_chunks(Path(path))):
            block.update(line + b"\n")
            lines += 1
            if lines % size == 0:
                digests.append(block.hexdigest())
                block = hashlib.sha256()
    except SourceFailed as exc:
        raise FitscopeError(f"{path} {exc}. Fix: download it again") from exc
    if lines % size:
        digests.append(block.hexdigest())
    return LineBlocks(size, lines, tuple(digests))


def _verify_blocks(lines: list[bytes], blocks: LineBlocks, want: int) -> None:
    if len(lines) < want:
        raise SourceFailed(
            f"ends after {len(lines)} lines, but its checksums list {blocks.lines} lines"
        )
    for k in range(math.ceil(want / blocks.size)):
        first = k * blocks.size
        got = hashlib.sha256(lines_text(lines[first : first + blocks.size])).hexdigest()
        if got != blocks.sha256[k]:
            last = min(first + blocks.size, blocks.lines)
            raise SourceFailed(
                f"lines {first + 1}-{last} do not match the mirror's checksums "
                "(corrupted in transit or a changed file)"
            )


@dataclass(frozen=True)
class Head:
    """What :func:`fetch_gzip_head` wrote: the source used and the sha256 of its text."""

    source: str
    lines: int
    sha256: str  # of the decompressed text of the lines written


def fetch_gzip_head(
    sources: Sequence[str],
    dest: str | os.PathLike[str],
    n_lines: int,
    *,
    policy: RetryPolicy = DEFAULT_RETRY,
    blocks: LineBlocks | None = None,
    check: Callable[[bytes, str], str | None] | None = None,
    fix: str = DEFAULT_FIX,
) -> Head:
    """Stream the first ``n_lines`` lines of a remote gzip text file into ``dest`` (gzip).

    Only the compressed bytes needed for those lines are transferred, so the head of a
    multi-GB file costs a few MB. Before anything is written the head is verified:
    against ``blocks`` (a mirror's block checksums; the last block is read to its end)
    and by ``check(text, sha256)``, which returns a problem (the source is refused and
    the next one tried) or ``None``. Raises :class:`DownloadFailed` ending in ``fix``.
    """
    for source in sources:
        check_source(source)
    want = n_lines
    if blocks is not None:
        want = min(math.ceil(n_lines / blocks.size) * blocks.size, blocks.lines)
    problems: list[str] = []
    for source in sources:
        local = local_path(source)

        def attempt(source: str = source, local: Path | None = local) -> list[bytes]:
            if local is not None:
                if not local.is_file():
                    raise SourceFailed("no such file")
                return _take_lines(_gzip_lines(_local_chunks(local)), want)
            with http_get(source, policy) as resp:
                return _take_lines(_gzip_lines(response_body(resp, policy)), want)

        try:
            lines = with_retries(source, policy, attempt)
            if len(lines) < n_lines:
                raise SourceFailed(
                    f"has only {len(lines)} rows but {n_lines} are needed (lower the split "
                    "sizes in params.yaml or use a larger source)"
                )
            if blocks is not None:
                _verify_blocks(lines, blocks, want)
            text = lines_text(lines[:n_lines])
            digest = hashlib.sha256(text).hexdigest()
            problem = check(text, digest) if check is not None else None
            if problem:
                raise SourceFailed(problem)
        except SourceFailed as exc:
            problems.append(f"{source}: {exc}")
            continue
        write_gzip(dest, text)
        return Head(source, n_lines, digest)
    raise download_failed(f"stream {Path(dest).name}", problems, fix)


def _take_lines(stream: Iterator[bytes], n: int) -> list[bytes]:
    """The first ``n`` lines (fewer at the end of the stream); stops reading there."""
    lines: list[bytes] = []
    for line in stream:
        lines.append(line)
        if len(lines) == n:
            break
    return lines


# --- archives ----------------------------------------------------------------------------------
def check_archive_members(names: Sequence[str], archive: str) -> None:
    """Refuse archive members that would escape the extraction directory."""
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (parts and ":" in parts[0]) or ".." in parts:
            raise FitscopeError(
                f"{archive} contains an unsafe member path {name!r} (absolute or '..'). "
                "Fix: the archive is corrupt or malicious; download it from the official source"
            )


def extract_zip_member(
    archive: str | os.PathLike[str], member: str, dest: str | os.PathLike[str]
) -> None:
    """Extract one member of a zip file to ``dest`` after checking every member path."""
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
        check_archive_members(names, str(archive))
        matches = [n for n in names if PurePosixPath(n).name == member]
        if not matches:
            raise FitscopeError(
                f"{archive} has no member {member!r} (it has {names[:5]}). "
                "Fix: use the official archive or a mirror with the right file"
            )
        with zf.open(matches[0]) as src, atomic_path(dest) as tmp, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK)
