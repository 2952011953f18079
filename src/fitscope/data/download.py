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
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeVar
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
import urllib3

from fitscope.core.errors import FitscopeError
from fitscope.core.progress import ByteProgress

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


class SourceFailed(Exception):
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


def with_retries(source: str, policy: RetryPolicy, attempt_once: Callable[[], T]) -> T:
    delay = policy.backoff_s
    for attempt in range(1, policy.attempts + 1):
        try:
            return attempt_once()
        except _Transient as exc:
            if attempt == policy.attempts:
                raise SourceFailed(f"{exc} (gave up after {attempt} attempts)") from exc
            log.warning(
                "%s: %s; retrying in %.1fs (%d/%d)", source, exc, delay, attempt, policy.attempts
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable: attempts >= 1")


def _stalled(policy: RetryPolicy) -> SourceFailed:
    # Not retried: a server that sent nothing for timeout_s rarely recovers within the
    # backoff, and retrying would cost attempts x timeout_s (minutes) before the next mirror.
    return SourceFailed(f"stalled (no bytes for {policy.timeout_s:g} s)")


def http_get(
    url: str, policy: RetryPolicy, headers: dict[str, str] | None = None
) -> requests.Response:
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
        raise SourceFailed(f"HTTP {resp.status_code}")
    return resp


def response_body(resp: requests.Response, policy: RetryPolicy) -> Iterator[bytes]:
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
        resp = http_get(url, policy, {"Range": f"bytes={have}-"} if have else None)
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
                for block in response_body(resp, policy):
                    fh.write(block)
                    shown.update(len(block))

    with_retries(url, policy, attempt)


def download_failed(what: str, problems: list[str], fix: str) -> DownloadFailed:
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
                    raise SourceFailed("no such file")
                shutil.copyfile(local, part)
            else:
                _download_http(source, part, policy)
            if part.stat().st_size == 0:
                part.unlink()
                raise SourceFailed("is empty")
            ok, actual = _checksum_ok(part, checksum)
            if not ok:
                part.unlink()  # never resume from bytes that are known to be wrong
                raise SourceFailed(f"checksum mismatch (expected {checksum}, got {actual})")
        except SourceFailed as exc:
            problems.append(f"{source}: {exc}")
            continue
        os.replace(part, dest)
        return source
    raise download_failed(f"fetch {dest.name}", problems, fix)
