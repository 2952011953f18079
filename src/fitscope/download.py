"""The one place that fetches files: retried, resumable, checksummed, atomic.

A *source* is an ``http(s)://`` URL, a ``file://`` URL or a local path. Every
function takes a list of sources tried in order (mirrors), writes to a
``.part``/temporary file and renames only after the content is verified, so a
later stage never reads a partial file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
from isal import isal_zlib

from fitscope.errors import FitscopeError
from fitscope.fileio import atomic_path, write_gzip

log = logging.getLogger(__name__)

USER_AGENT = "fitscope/0.1 (+https://github.com/fitscope)"
CHUNK = 1 << 20
# Transient failures worth retrying against the same source.
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one source before moving on to the next mirror."""

    attempts: int = 4
    backoff_s: float = 2.0  # doubled after every failed attempt
    timeout_s: float = 60.0


DEFAULT_RETRY = RetryPolicy()


class _SourceFailed(Exception):
    """This source cannot serve the file (after retries): try the next mirror."""


class _Transient(Exception):
    """A failure worth retrying against the same source."""


def _local_path(source: str) -> Path | None:
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


def _with_retries(source: str, policy: RetryPolicy, attempt_once) -> None:
    delay = policy.backoff_s
    for attempt in range(1, policy.attempts + 1):
        try:
            attempt_once()
            return
        except _Transient as exc:
            if attempt == policy.attempts:
                raise _SourceFailed(f"{exc} (gave up after {attempt} attempts)") from exc
            log.warning(
                "%s: %s; retrying in %.1fs (%d/%d)", source, exc, delay, attempt, policy.attempts
            )
            time.sleep(delay)
            delay *= 2


def _get(url: str, policy: RetryPolicy, headers: dict[str, str] | None = None) -> requests.Response:
    try:
        resp = requests.get(
            url,
            stream=True,
            timeout=policy.timeout_s,
            headers={"User-Agent": USER_AGENT, **(headers or {})},
        )
    except requests.RequestException as exc:  # DNS, refused, timeout
        raise _Transient(f"cannot connect ({type(exc).__name__})") from exc
    if resp.status_code in RETRY_STATUS:
        resp.close()
        raise _Transient(f"HTTP {resp.status_code}")
    if resp.status_code >= 400 and resp.status_code != 416:
        resp.close()
        raise _SourceFailed(f"HTTP {resp.status_code}")
    return resp


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
            try:
                with open(part, mode) as fh:
                    # Small blocks: after a drop, at most one block is fetched again.
                    for block in resp.iter_content(1 << 16):
                        fh.write(block)
            except requests.RequestException as exc:
                raise _Transient(f"connection dropped ({type(exc).__name__})") from exc

    _with_retries(url, policy, attempt)


def download_file(
    sources: Sequence[str],
    dest: str | os.PathLike[str],
    *,
    checksum: str | None = None,
    policy: RetryPolicy = DEFAULT_RETRY,
) -> str:
    """Fetch the first source that serves a file matching ``checksum`` to ``dest``.

    Interrupted downloads resume from ``dest.part`` on the next attempt or call.
    Returns the source used.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    problems: list[str] = []
    for source in sources:
        local = _local_path(source)
        try:
            if local is not None:
                if not local.is_file():
                    raise _SourceFailed("no such file")
                shutil.copyfile(local, part)
            else:
                _download_http(source, part, policy)
        except _SourceFailed as exc:
            problems.append(f"{source}: {exc}")
            continue
        ok, actual = _checksum_ok(part, checksum)
        if not ok:
            part.unlink()
            problems.append(f"{source}: checksum mismatch (expected {checksum}, got {actual})")
            continue
        os.replace(part, dest)
        return source
    raise FitscopeError(
        f"could not fetch {dest.name}: {'; '.join(problems)}. Fix: check the network or "
        "point the data source at a mirror (data.<dataset>.mirror or FITSCOPE_MIRROR)"
    )


def _gzip_lines(chunks: Iterator[bytes], source: str) -> Iterator[bytes]:
    """Decompress a (multi-member) gzip byte stream and yield complete lines."""
    decomp = isal_zlib.decompressobj(wbits=31)
    pending = b""
    for chunk in chunks:
        while chunk:
            try:
                data = decomp.decompress(chunk)
            except isal_zlib.error as exc:
                raise FitscopeError(
                    f"{source} is not valid gzip ({exc}). Fix: check the URL or mirror file"
                ) from exc
            chunk = decomp.unused_data
            if decomp.eof and chunk:
                decomp = isal_zlib.decompressobj(wbits=31)
            lines = (pending + data).split(b"\n")
            pending = lines.pop()
            yield from lines
    if not decomp.eof:
        raise FitscopeError(
            f"{source} is a truncated gzip stream. Fix: re-download it or use another mirror"
        )
    if pending:
        yield pending


def _local_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            yield block


def fetch_gzip_head(
    sources: Sequence[str],
    dest: str | os.PathLike[str],
    n_lines: int,
    *,
    policy: RetryPolicy = DEFAULT_RETRY,
) -> str:
    """Stream the first ``n_lines`` lines of a remote gzip text file into ``dest`` (gzip).

    Only the compressed bytes needed for those lines are transferred, so the head
    of a multi-GB file costs a few MB. Returns the source used.
    """
    problems: list[str] = []
    for source in sources:
        local = _local_path(source)
        lines: list[bytes] = []

        def attempt(
            source: str = source, local: Path | None = local, lines: list[bytes] = lines
        ) -> None:
            lines.clear()
            if local is not None:
                if not local.is_file():
                    raise _SourceFailed("no such file")
                chunks: Iterator[bytes] = _local_chunks(local)
                _take_lines(_gzip_lines(chunks, source), n_lines, lines)
                return
            resp = _get(source, policy)
            with resp:
                try:
                    _take_lines(_gzip_lines(resp.iter_content(1 << 16), source), n_lines, lines)
                except requests.RequestException as exc:
                    raise _Transient(f"connection dropped ({type(exc).__name__})") from exc

        try:
            _with_retries(source, policy, attempt)
        except _SourceFailed as exc:
            problems.append(f"{source}: {exc}")
            continue
        if len(lines) < n_lines:
            raise FitscopeError(
                f"{source} has only {len(lines)} rows but {n_lines} are needed. Fix: lower the "
                "split sizes in params.yaml or use a larger source"
            )
        write_gzip(dest, b"\n".join(lines) + b"\n")
        return source
    raise FitscopeError(
        f"could not stream {Path(dest).name}: {'; '.join(problems)}. Fix: check the network or "
        "point the data source at a mirror (data.<dataset>.mirror or FITSCOPE_MIRROR)"
    )


def _take_lines(stream: Iterator[bytes], n: int, into: list[bytes]) -> None:
    for line in stream:
        if line:
            into.append(line)
            if len(into) == n:
                return


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
