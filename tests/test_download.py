"""The download code paths against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import time
import zipfile
import zlib

import numpy as np
import pytest
from conftest import flip_silently, higgs_gzip

from fitscope.core.errors import FitscopeError
from fitscope.data.download import RetryPolicy, download_file
from fitscope.data.gzip_stream import (
    Head,
    check_archive_members,
    extract_zip_member,
    fetch_gzip_head,
    gzip_line_blocks,
    lines_text,
)


def sha(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


def test_full_download_verifies_checksum(file_server, tmp_path, higgs_sample_bytes, fast_retry):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    dest = tmp_path / "HIGGS.csv.gz"
    used = download_file([url], dest, checksum=sha(higgs_sample_bytes), policy=fast_retry)
    assert used == url
    assert dest.read_bytes() == higgs_sample_bytes
    assert not (tmp_path / "HIGGS.csv.gz.part").exists()


def test_dropped_connection_resumes_with_range(
    file_server, tmp_path, higgs_sample_bytes, fast_retry
):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes, drop_after=1_000_000)
    dest = tmp_path / "HIGGS.csv.gz"
    download_file([url], dest, checksum=sha(higgs_sample_bytes), policy=fast_retry)
    assert dest.read_bytes() == higgs_sample_bytes
    ranges = [r for _, r in file_server.requests]
    assert ranges == [None, "bytes=1000000-"]  # every byte received was kept, none fetched twice


def test_partial_file_from_an_earlier_run_is_resumed(
    file_server, tmp_path, higgs_sample_bytes, fast_retry
):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    dest = tmp_path / "HIGGS.csv.gz"
    (tmp_path / "HIGGS.csv.gz.part").write_bytes(higgs_sample_bytes[:500_000])
    download_file([url], dest, checksum=sha(higgs_sample_bytes), policy=fast_retry)
    assert dest.read_bytes() == higgs_sample_bytes
    assert file_server.requests == [("/HIGGS.csv.gz", "bytes=500000-")]


def test_server_errors_are_retried_then_succeed(file_server, tmp_path, fast_retry):
    url = file_server.add("/f.bin", b"payload", fail_times=2, fail_status=503)
    download_file([url], tmp_path / "f.bin", checksum=sha(b"payload"), policy=fast_retry)
    assert len(file_server.requests) == 3


def test_404_falls_back_to_next_mirror(file_server, tmp_path, fast_retry):
    good = file_server.add("/mirror2/f.bin", b"payload")
    used = download_file(
        [file_server.base_url + "/mirror1/f.bin", good],
        tmp_path / "f.bin",
        checksum=sha(b"payload"),
        policy=fast_retry,
    )
    assert used == good
    assert file_server.requests[0] == ("/mirror1/f.bin", None)  # 404 is not retried


def test_persistent_5xx_gives_one_line_error_and_no_file(file_server, tmp_path, fast_retry):
    url = file_server.add("/f.bin", b"x", fail_times=99, fail_status=500)
    with pytest.raises(FitscopeError) as err:
        download_file([url], tmp_path / "f.bin", policy=fast_retry)
    msg = str(err.value)
    assert "HTTP 500" in msg and "gave up after 3 attempts" in msg and "Fix:" in msg
    assert "\n" not in msg
    assert not (tmp_path / "f.bin").exists()


def test_unreachable_host_is_a_clear_error(tmp_path, fast_retry):
    # Port 9 on loopback: nothing listens there, the connection is refused at once.
    with pytest.raises(FitscopeError, match="cannot connect"):
        download_file(["http://127.0.0.1:9/f.bin"], tmp_path / "f.bin", policy=fast_retry)


def test_checksum_mismatch_leaves_nothing(file_server, tmp_path, fast_retry):
    url = file_server.add("/f.bin", b"tampered")
    with pytest.raises(FitscopeError, match="checksum mismatch"):
        download_file([url], tmp_path / "f.bin", checksum=sha(b"original"), policy=fast_retry)
    assert list(tmp_path.iterdir()) == []


def test_local_directory_mirror(tmp_path, fast_retry):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "f.bin").write_bytes(b"payload")
    download_file(
        [str(tmp_path / "mirror" / "f.bin")],
        tmp_path / "out" / "f.bin",
        checksum=sha(b"payload"),
        policy=fast_retry,
    )
    assert (tmp_path / "out" / "f.bin").read_bytes() == b"payload"


def test_head_streaming_reads_only_the_needed_part(file_server, tmp_path, fast_retry):
    # A hardly compressible ~20 MB gzip: the first 100 lines need a few kB of it.
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savetxt(buf, rng.random((120_000, 29)), fmt="%.9f", delimiter=",")
    lines = buf.getvalue().decode().splitlines()
    body = gzip.compress(buf.getvalue(), compresslevel=1)
    assert len(body) > 15_000_000
    url = file_server.add("/HIGGS.csv.gz", body)
    dest = tmp_path / "head.csv.gz"
    fetch_gzip_head([url], dest, 100, policy=fast_retry)
    got = gzip.decompress(dest.read_bytes()).decode().splitlines()
    assert got == lines[:100]
    # The client hung up early: beyond what socket buffers took (a few MB on loopback),
    # the server could not send the file.
    time.sleep(0.2)
    assert file_server.bytes_sent["/HIGGS.csv.gz"] < len(body) // 2


def test_head_of_real_sample(file_server, tmp_path, higgs_sample_bytes, fast_retry):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    dest = tmp_path / "head.csv.gz"
    fetch_gzip_head([url], dest, 2500, policy=fast_retry)
    want = gzip.decompress(higgs_sample_bytes).splitlines()[:2500]
    assert gzip.decompress(dest.read_bytes()).splitlines() == want


def test_head_restarts_after_drop(file_server, tmp_path, higgs_sample_bytes, fast_retry):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes, drop_after=200_000)
    dest = tmp_path / "head.csv.gz"
    fetch_gzip_head([url], dest, 5000, policy=fast_retry)
    assert len(gzip.decompress(dest.read_bytes()).splitlines()) == 5000


def test_head_longer_than_source_is_an_error(file_server, tmp_path, higgs_sample_bytes, fast_retry):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    with pytest.raises(FitscopeError, match="has only 10984 rows but 20000 are needed"):
        fetch_gzip_head([url], tmp_path / "h.csv.gz", 20_000, policy=fast_retry)
    assert not (tmp_path / "h.csv.gz").exists()


def test_truncated_gzip_stream_is_an_error(file_server, tmp_path, higgs_sample_bytes, fast_retry):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes[:300_000])
    with pytest.raises(FitscopeError, match="truncated gzip"):
        fetch_gzip_head([url], tmp_path / "h.csv.gz", 10_984, policy=fast_retry)
    assert not (tmp_path / "h.csv.gz").exists()


def test_not_gzip_is_an_error(file_server, tmp_path, fast_retry):
    url = file_server.add("/HIGGS.csv.gz", b"<html>moved</html>")
    with pytest.raises(FitscopeError, match=r"is not gzip \(it starts with b'<html>moved"):
        fetch_gzip_head([url], tmp_path / "h.csv.gz", 10, policy=fast_retry)


@pytest.mark.parametrize("name", ["/etc/passwd", "../evil.csv.gz", "a/../../evil", "C:/x"])
def test_archive_traversal_is_refused(tmp_path, name):
    archive = tmp_path / "higgs.zip"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("HIGGS.csv.gz", b"ok")
        zf.writestr(name, b"evil")
    archive.write_bytes(buf.getvalue())
    with pytest.raises(FitscopeError, match="unsafe member path"):
        extract_zip_member(archive, "HIGGS.csv.gz", tmp_path / "out" / "HIGGS.csv.gz")
    assert not (tmp_path / "out" / "HIGGS.csv.gz").exists()


def test_safe_archive_extracts(tmp_path):
    archive = tmp_path / "higgs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("higgs/HIGGS.csv.gz", b"payload")
    extract_zip_member(archive, "HIGGS.csv.gz", tmp_path / "HIGGS.csv.gz")
    assert (tmp_path / "HIGGS.csv.gz").read_bytes() == b"payload"
    check_archive_members(["a/b.txt", "c.txt"], "ok.zip")  # no exception


# --- stalls, bad content, short reads, bad URLs --------------------------------------------------
@pytest.fixture
def stall_policy():
    """One-second stall limit (``download.timeout_s``), several attempts allowed."""
    return RetryPolicy(attempts=4, backoff_s=0.01, timeout_s=1)


@pytest.mark.parametrize("mode", ["file", "head"])
def test_stalled_server_is_given_up_within_seconds(
    file_server, tmp_path, higgs_sample_bytes, stall_policy, mode
):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes, stall_after=100_000)
    started = time.monotonic()
    with pytest.raises(FitscopeError) as err:
        if mode == "file":
            download_file([url], tmp_path / "f.gz", checksum=sha(b"x"), policy=stall_policy)
        else:
            fetch_gzip_head([url], tmp_path / "f.gz", 10_000, policy=stall_policy)
    elapsed = time.monotonic() - started
    assert "stalled (no bytes for 1 s)" in str(err.value) and "\n" not in str(err.value)
    assert "connection dropped" not in str(err.value)
    assert elapsed < 5  # one stall limit, not attempts x timeout
    assert len(file_server.requests) == 1
    assert not (tmp_path / "f.gz").exists()


def test_stalled_mirror_falls_back_to_the_next(
    file_server, tmp_path, higgs_sample_bytes, stall_policy
):
    stalled = file_server.add("/a/HIGGS.csv.gz", higgs_sample_bytes, stall_after=0)
    good = file_server.add("/b/HIGGS.csv.gz", higgs_sample_bytes)
    head = fetch_gzip_head([stalled, good], tmp_path / "h.gz", 100, policy=stall_policy)
    assert head.source == good


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<!DOCTYPE html><html>Moved</html>", "is not gzip (it starts with b'<!DOCTYPE"),
        (b"", "is empty"),
        ("truncated", "is a truncated gzip stream"),
        ("corrupt", "is corrupt gzip"),
    ],
)
def test_bad_content_from_the_first_url_tries_the_next(
    file_server, tmp_path, higgs_sample_bytes, fast_retry, body, problem
):
    small = higgs_gzip(higgs_sample_bytes, 300)
    if body == "truncated":
        body = small[: len(small) // 2]
    elif body == "corrupt":
        body = small[:20] + b"\xff" * 64 + small[84:]
    bad = file_server.add("/a/HIGGS.csv.gz", body)
    good = file_server.add("/b/HIGGS.csv.gz", small)
    head = fetch_gzip_head([bad, good], tmp_path / "h.gz", 300, policy=fast_retry)
    assert head.source == good
    assert gzip.decompress((tmp_path / "h.gz").read_bytes()) == gzip.decompress(small)
    # Bad content is not retried: one request to each source.
    assert [p for p, _ in file_server.requests] == ["/a/HIGGS.csv.gz", "/b/HIGGS.csv.gz"]
    # With no good source left, the one-line error names each source's problem.
    with pytest.raises(FitscopeError) as err:
        fetch_gzip_head([bad], tmp_path / "x.gz", 300, policy=fast_retry)
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x.gz").exists()


@pytest.mark.parametrize(("body", "problem"), [(b"", "is empty"), (b"tampered", "checksum")])
def test_bad_file_from_the_first_url_tries_the_next(
    file_server, tmp_path, fast_retry, body, problem
):
    bad = file_server.add("/a/f.bin", body)
    good = file_server.add("/b/f.bin", b"payload")
    dest = tmp_path / "f.bin"
    assert download_file([bad, good], dest, checksum=sha(b"payload"), policy=fast_retry) == good
    assert dest.read_bytes() == b"payload"
    with pytest.raises(FitscopeError, match=problem):
        download_file([bad], tmp_path / "g.bin", checksum=sha(b"payload"), policy=fast_retry)


def test_empty_local_file_is_called_empty(tmp_path, fast_retry):
    (tmp_path / "empty.gz").write_bytes(b"")
    with pytest.raises(FitscopeError, match=r"empty.gz: is empty\. Fix:"):
        fetch_gzip_head([str(tmp_path / "empty.gz")], tmp_path / "h.gz", 5, policy=fast_retry)
    with pytest.raises(FitscopeError, match=r"empty.gz: is empty\. Fix:"):
        download_file([str(tmp_path / "empty.gz")], tmp_path / "f.gz", policy=fast_retry)


def test_a_drop_after_the_needed_lines_arrived_costs_no_second_request(
    file_server, tmp_path, higgs_sample_bytes, fast_retry
):
    drop_at = 200_000  # the server hangs up mid-block (64 KiB blocks: 196,608 + 3,392)

    def lines_within(n_bytes: int) -> int:
        text = zlib.decompressobj(wbits=31).decompress(higgs_sample_bytes[:n_bytes])
        return text.count(b"\n")

    n = lines_within(drop_at - 1_000)
    assert n > lines_within(3 * 65_536)  # the lines end in the last, partial block
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes, drop_after=drop_at)
    fetch_gzip_head([url], tmp_path / "h.gz", n, policy=fast_retry)
    assert len(file_server.requests) == 1  # the partial block was used, not thrown away
    want = gzip.decompress(higgs_sample_bytes).split(b"\n")[:n]
    assert gzip.decompress((tmp_path / "h.gz").read_bytes()).split(b"\n")[:-1] == want


@pytest.mark.parametrize("fetch", ["file", "head"])
def test_unknown_url_scheme_is_refused_before_any_work(tmp_path, fast_retry, fetch):
    with pytest.raises(FitscopeError) as err:
        if fetch == "file":
            download_file(["htp://127.0.0.1/f.gz"], tmp_path / "f.gz", policy=fast_retry)
        else:
            fetch_gzip_head(["htp://127.0.0.1/f.gz"], tmp_path / "f.gz", 5, policy=fast_retry)
    assert str(err.value).startswith("unsupported URL scheme 'htp' in 'htp://127.0.0.1/f.gz'")
    assert list(tmp_path.iterdir()) == []


# --- verified heads ----------------------------------------------------------------------------
def test_head_sha256_is_that_of_the_written_text(
    file_server, tmp_path, higgs_sample_bytes, fast_retry
):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    head = fetch_gzip_head([url], tmp_path / "h.gz", 1234, policy=fast_retry)
    text = gzip.decompress((tmp_path / "h.gz").read_bytes())
    assert head == Head(url, 1234, hashlib.sha256(text).hexdigest())
    assert text.count(b"\n") == 1234


def test_block_checksums_accept_any_head_length(file_server, tmp_path, higgs_sample_bytes):
    (tmp_path / "HIGGS.csv.gz").write_bytes(higgs_gzip(higgs_sample_bytes, 2500))
    blocks = gzip_line_blocks(tmp_path / "HIGGS.csv.gz", 1000)
    assert blocks.lines == 2500 and len(blocks.sha256) == 3
    url = file_server.add("/HIGGS.csv.gz", (tmp_path / "HIGGS.csv.gz").read_bytes())
    for n in (1, 999, 1000, 1001, 2500):  # the last block is read to its end and verified
        head = fetch_gzip_head([url], tmp_path / "h.gz", n, blocks=blocks)
        assert head.lines == n


def test_silent_flip_in_a_streamed_head_is_refused_by_block_checksums(
    file_server, tmp_path, higgs_sample_bytes, fast_retry
):
    good = higgs_gzip(higgs_sample_bytes, 6000)  # the head ends long before the gzip CRC
    (tmp_path / "good.gz").write_bytes(good)
    blocks = gzip_line_blocks(tmp_path / "good.gz", 1000)
    flipped = flip_silently(good, 2500)
    bad = file_server.add("/a/HIGGS.csv.gz", flipped)
    # Without checksums the flip goes through: the deflate stream still decodes.
    fetch_gzip_head([bad], tmp_path / "unverified.gz", 2500, policy=fast_retry)
    assert gzip.decompress((tmp_path / "unverified.gz").read_bytes()) != lines_text(
        gzip.decompress(good).split(b"\n")[:2500]
    )
    with pytest.raises(FitscopeError, match=r"lines \d+-\d+ do not match the mirror's checksums"):
        fetch_gzip_head([bad], tmp_path / "h.gz", 2500, blocks=blocks, policy=fast_retry)
    assert not (tmp_path / "h.gz").exists()
    # A good second source is used instead.
    ok = file_server.add("/b/HIGGS.csv.gz", good)
    assert fetch_gzip_head([bad, ok], tmp_path / "h.gz", 2500, blocks=blocks).source == ok


def test_check_refuses_a_source_and_nothing_is_written(file_server, tmp_path, higgs_sample_bytes):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    seen = []

    def check(text: bytes, digest: str) -> str | None:
        seen.append(digest)
        return f"sha256 {digest} is not the pinned one"

    with pytest.raises(FitscopeError, match=r"is not the pinned one\. Fix: pin it") as err:
        fetch_gzip_head([url], tmp_path / "h.gz", 10, check=check, fix="pin it")
    assert seen[0] in str(err.value)
    assert list(tmp_path.iterdir()) == []
