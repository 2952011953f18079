"""The one place that fetches files: retried, resumable, checksummed, atomic.

A *source* is an ``http(s)://`` URL, a ``file://`` URL or a local path. Every
function takes a list of sources tried in order (mirrors): a source that fails,
stalls or serves bad content (not gzip, empty, truncated, a checksum mismatch)
is given up and the next one is tried. Files are written to a ``.part`` or
temporary file and renamed only after the content is verified, so a later stage
never reads a partial or unverified file.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
import urllib3
from isal import isal_zlib

from fitscope.errors import FitscopeError
from fitscope.fileio import atomic_path, write_gzip
from fitscope.progress import ByteProgress

log = logging.getLogger(__name__)

USER_AGENT = "fitscope/0.1 (+https://github.com/fitscope)"
CHUNK = 1 << 20
BLOCK = 1 << 16  # network read size: after a drop, a resume repeats nothing
# Transient failures worth retrying against the same source.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
SCHEMES = ("http", "https", "file")
GZIP_MAGIC = b"\x1f\x8b"
DEFAULT_FIX = "check the network or point the data source at a mirror"

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one source before moving on to the next mirror."""

    attempts: int = 4
    backoff_s: float = 2.0  # doubled after every failed attempt
    timeout_s: float = 60.0  # also the stall limit: no byte for this long gives the source up


DEFAULT_RETRY = RetryPolicy()


class DownloadFailed(FitscopeError):
    """No source could serve the file; ``problems`` holds one line per source."""

    def __init__(self, message: str, problems: list[str]) -> None:
        super().__init__(message)
        self.problems = problems


class _SourceFailed(Exception):
    """This source cannot serve the file (after retries, or bad content): try the next."""


class _Transient(Exception):
    """A failure worth retrying against the same source."""


def check_source(source: str) -> None:
    """Refuse a source with an unknown URL scheme (a typo like ``htp://``) before any work."""
    scheme = urlparse(source).scheme
    if scheme not in SCHEMES and "://" in source:
        scheme = source.partition("://")[0]
        raise FitscopeError(
            f"unsupported URL scheme {scheme!r} in {source!r}. Fix: use http://, https://, "
            "file:// or a local directory path"
        )


def local_path(source: str) -> Path | None:
    """The local file a source names, or ``None`` for an ``http(s)://`` URL."""
    check_source(source)
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme in ("http", "https"):
        return None
    return Path(source)


def _checksum_ok(path: Path, checksum: str | None) -> tuple[bool, str]:
    """Check ``checksum`` ("sha256:<hex>" or "md5:<hex>"); return (ok, actual)."""
    if not checksum:
        return True, ""
    algo, _, expected = checksum.partition(":")
    digest = hashlib.new(algo)
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    actual = digest.hexdigest()
    return actual == expected.lower(), f"{algo}:{actual}"


def _with_retries(source: str, policy: RetryPolicy, attempt_once: Callable[[], T]) -> T:
    delay = policy.backoff_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return attempt_once()
        except _Transient as exc:
            if attempt == policy.attempts:
                raise _SourceFailed(f"{exc} (gave up after {attempt} attempts)") from exc
            log.warning(
                "%s: %s; retrying in %.1fs (%d/%d)", source, exc, delay, attempt, policy.attempts
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable: attempts >= 1")


def _stalled(policy: RetryPolicy) -> _SourceFailed:
    # Not retried: a server that sent nothing for timeout_s rarely recovers within the
    # backoff, and retrying would cost attempts x timeout_s (minutes) before the next mirror.
    return _SourceFailed(f"stalled (no bytes for {policy.timeout_s:g} s)")


def _get(url: str, policy: RetryPolicy, headers: dict[str, str] | None = None) -> requests.Response:
    try:
        resp = requests.get(
            url,
            stream=True,
            timeout=policy.timeout_s,
            # identity: the bytes on disk must be the file's bytes (checksums are over them).
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity", **(headers or {})},
        )
    except requests.ConnectTimeout as exc:
        raise _Transient(f"cannot connect (no answer in {policy.timeout_s:g} s)") from exc
    except requests.ReadTimeout as exc:  # connected, but no response headers
        raise _stalled(policy) from exc
    except requests.RequestException as exc:  # DNS, refused
        raise _Transient(f"cannot connect ({type(exc).__name__})") from exc
    if resp.status_code in RETRY_STATUS:
        resp.close()
        raise _Transient(f"HTTP {resp.status_code}")
    if resp.status_code >= 400 and resp.status_code != 416:
        resp.close()
        raise _SourceFailed(f"HTTP {resp.status_code}")
    return resp


def _body(resp: requests.Response, policy: RetryPolicy) -> Iterator[bytes]:
    """The response body as it arrives, undecoded.

    ``read1`` hands over every byte received before a drop; ``iter_content`` would
    discard the last partial block, so a resume would fetch it again and a head that
    was complete would be streamed again.
    """
    try:
        while block := resp.raw.read1(BLOCK, decode_content=False):
            yield block
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise _stalled(policy) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise _Transient(f"connection dropped ({type(exc).__name__})") from exc


def _download_http(url: str, part: Path, policy: RetryPolicy) -> None:
    """Append the rest of ``url`` to ``part``, resuming with HTTP Range after drops."""

    def attempt() -> None:
        have = part.stat().st_size if part.exists() else 0
        resp = _get(url, policy, {"Range": f"bytes={have}-"} if have else None)
        with resp:
            if resp.status_code == 416:  # nothing left to fetch: the checksum decides
                return
            mode = "ab" if resp.status_code == 206 else "wb"  # 200: server ignored Range
            if mode == "ab":
                log.info("%s: resuming at byte %d", url, have)
            start = have if mode == "ab" else 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length and length.isdigit() else None
            with (
                open(part, mode) as fh,
                ByteProgress(
                    total, f"download {PurePosixPath(urlparse(url).path).name}", initial=start
                ) as shown,
            ):
                for block in _body(resp, policy):
                    fh.write(block)
                    shown.update(len(block))

    _with_retries(url, policy, attempt)


def _failed(what: str, problems: list[str], fix: str) -> DownloadFailed:
    return DownloadFailed(f"could not {what}: {'; '.join(problems)}. Fix: {fix}", problems)


def download_file(
    sources: Sequence[str],
    dest: str | os.PathLike[str],
    *,
    checksum: str | None = None,
    policy: RetryPolicy = DEFAULT_RETRY,
    fix: str = DEFAULT_FIX,
) -> str:
    """Fetch the first source that serves a file matching ``checksum`` to ``dest``.

    Interrupted downloads resume from ``dest.part`` on the next attempt or call.
    Returns the source used; raises :class:`DownloadFailed` (ending in ``fix``).
    """
    for source in sources:
        check_source(source)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problems: list[str] = []
    for source in sources:
        local = local_path(source)
        try:
            if local is not None:
                if not local.is_file():
                    raise _SourceFailed("no such file")
                shutil.copyfile(local, part)
            else:
                _download_http(source, part, policy)
            if part.stat().st_size == 0:
                part.unlink()
                raise _SourceFailed("is empty")
            ok, actual = _checksum_ok(part, checksum)
            if not ok:
                part.unlink()  # never resume from bytes that are known to be wrong
                raise _SourceFailed(f"checksum mismatch (expected {checksum}, got {actual})")
        except _SourceFailed as exc:
            problems.append(f"{source}: {exc}")
            continue
        os.replace(part, dest)
        return source
    raise _failed(f"fetch {dest.name}", problems, fix)


# --- streamed gzip heads -----------------------------------------------------------------------
def _gzip_lines(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Decompress a (multi-member) gzip byte stream and yield its lines (without ``\\n``).

    Bad content raises ``_SourceFailed``: it is the source's fault, so the next one is tried.
    """
    decomp = isal_zlib.decompressobj(wbits=31)
    pending = b""
    received = 0
    for chunk in chunks:
        if not received and chunk and not GZIP_MAGIC.startswith(chunk[:2]):
            raise _SourceFailed(f"is not gzip (it starts with {chunk[:16]!r})")
        received += len(chunk)
        while chunk:
            if decomp.eof:  # the next member of a multi-member file
                decomp = isal_zlib.decompressobj(wbits=31)
            try:
                data = decomp.decompress(chunk)
            except isal_zlib.error as exc:
                raise _SourceFailed(f"is corrupt gzip ({exc})") from exc
            chunk = decomp.unused_data if decomp.eof else b""
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            yield from lines
    if not received:
        raise _SourceFailed("is empty")
    if not decomp.eof:
        raise _SourceFailed("is a truncated gzip stream")
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
    except _SourceFailed as exc:
        raise FitscopeError(f"{path} {exc}. Fix: download it again") from exc
    if lines % size:
        digests.append(block.hexdigest())
    return LineBlocks(size, lines, tuple(digests))


def _verify_blocks(lines: list[bytes], blocks: LineBlocks, want: int) -> None:
    if len(lines) < want:
        raise _SourceFailed(
            f"ends after {len(lines)} lines, but its checksums list {blocks.lines} lines"
        )
    for k in range(math.ceil(want / blocks.size)):
        first = k * blocks.size
        got = hashlib.sha256(lines_text(lines[first : first + blocks.size])).hexdigest()
        if got != blocks.sha256[k]:
            last = min(first + blocks.size, blocks.lines)
            raise _SourceFailed(
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
                    raise _SourceFailed("no such file")
                return _take_lines(_gzip_lines(_local_chunks(local)), want)
            with _get(source, policy) as resp:
                return _take_lines(_gzip_lines(_body(resp, policy)), want)

        try:
            lines = _with_retries(source, policy, attempt)
            if len(lines) < n_lines:
                raise _SourceFailed(
                    f"has only {len(lines)} rows but {n_lines} are needed (lower the split "
                    "sizes in params.yaml or use a larger source)"
                )
            if blocks is not None:
                _verify_blocks(lines, blocks, want)
            text = lines_text(lines[:n_lines])
            digest = hashlib.sha256(text).hexdigest()
            problem = check(text, digest) if check is not None else None
            if problem:
                raise _SourceFailed(problem)
        except _SourceFailed as exc:
            problems.append(f"{source}: {exc}")
            continue
        write_gzip(dest, text)
        return Head(source, n_lines, digest)
    raise _failed(f"stream {Path(dest).name}", problems, fix)


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
