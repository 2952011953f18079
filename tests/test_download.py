"""The download code paths against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import io
import time
import zipfile

import numpy as np
import pytest

from fitscope.download import (
    check_archive_members,
    download_file,
    extract_zip_member,
    fetch_gzip_head,
)
from fitscope.errors import FitscopeError


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
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    # It resumes from what reached the disk (at most one 64 KiB block is lost), not from 0.
    assert 1_000_000 - 65_536 <= resumed_at <= 1_000_000


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
    with pytest.raises(FitscopeError, match="not valid gzip"):
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
