"""Data stages: sources, parsing, validation and splits on real (tiny) data."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import flip_silently, higgs_gzip, last_error_line, run_train, serve_mnist

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import sha256_file
from fitscope.data import official
from fitscope.data.higgs import fetch_higgs, split_higgs
from fitscope.data.higgs_csv import higgs_blocks
from fitscope.data.mirror import fill_mirror, write_mirror_checksums
from fitscope.data.mnist import fetch_mnist, read_idx, split_mnist, write_idx
from fitscope.data.official import (
    CHECKSUMS_FILE,
    HIGGS_EMBEDDED_SHA256,
    HIGGS_FILE,
    MIRROR_ENV,
    MNIST_FILES,
)
from fitscope.data.params import HiggsParams, MnistParams, higgs_params, mnist_params
from fitscope.data.splits import load_split
from fitscope.training.datamodule import ArrayDataModule, split_tensors


@pytest.fixture
def higgs_rows(higgs_sample_bytes) -> list[list[float]]:
    return [
        list(map(float, line.split(b",")))
        for line in gzip.decompress(higgs_sample_bytes).splitlines()
    ]


def read_higgs_csv(path) -> None:
    """Parse a whole HIGGS CSV(.gz) as the split stage does (block by block, checked)."""
    for _ in higgs_blocks(path):
        pass


def test_embedded_higgs_split_follows_the_protocol(tmp_path, higgs_rows):
    params = HiggsParams()
    info = fetch_higgs(params, tmp_path / "raw")
    assert info["sha256"] == HIGGS_EMBEDDED_SHA256
    manifest = split_higgs(params, tmp_path / "raw", tmp_path / "out")
    rows = {k: v["rows"] for k, v in manifest["splits"].items()}
    assert rows == {"val": 1000, "train": 8984, "test": 1000}
    x_val, y_val = load_split(tmp_path / "out", "val")
    x_tr, _ = load_split(tmp_path / "out", "train")
    x_te, y_te = load_split(tmp_path / "out", "test")
    assert isinstance(x_val, np.memmap) and x_val.dtype == np.float32 and x_val.shape == (1000, 28)
    # validation = first rows, training = next rows, test = last rows of the file
    np.testing.assert_allclose(x_val[0], higgs_rows[0][1:], rtol=1e-6)
    np.testing.assert_allclose(x_tr[0], higgs_rows[1000][1:], rtol=1e-6)
    np.testing.assert_allclose(x_te[-1], higgs_rows[-1][1:], rtol=1e-6)
    assert y_te[-1] == higgs_rows[-1][0] and y_val[0] == higgs_rows[0][0]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["inputs_sha256"]["HIGGS.csv.gz"] == HIGGS_EMBEDDED_SHA256
    assert sum(on_disk["splits"]["train"]["class_counts"].values()) == 8984


def test_uci_source_streams_only_the_head(
    tmp_path, file_server, higgs_sample_bytes, monkeypatch, fast_retry
):
    url = file_server.add("/00280/HIGGS.csv.gz", higgs_sample_bytes)
    monkeypatch.setattr(official, "HIGGS_URLS", (file_server.base_url + "/missing.gz", url))
    params = HiggsParams(source="uci", val_rows=500, train_rows=2000, test_rows=300)
    info = fetch_higgs(params, tmp_path / "raw", fast_retry)
    assert info["url"] == url
    raw = gzip.decompress((tmp_path / "raw" / "HIGGS.csv.gz").read_bytes()).splitlines()
    assert len(raw) == 2800
    manifest = split_higgs(params, tmp_path / "raw", tmp_path / "out")
    assert manifest["splits"]["test"] == {
        **manifest["splits"]["test"],
        "rows": 300,
        "first_row": 2500,
    }


def test_full_size_verifies_the_official_checksum(
    tmp_path, file_server, higgs_sample_bytes, fast_retry
):
    # The fixture is not the 2.8 GB official file, so the official sha256 must reject it.
    file_server.add("/m/HIGGS.csv.gz", higgs_sample_bytes)
    params = HiggsParams(source="mirror", size="full", mirror=file_server.base_url + "/m")
    with pytest.raises(FitscopeError, match="checksum mismatch"):
        fetch_higgs(params, tmp_path / "raw", fast_retry)
    assert not (tmp_path / "raw" / "HIGGS.csv.gz").exists()


def test_full_size_from_mirror_param(
    tmp_path, file_server, higgs_sample_bytes, monkeypatch, fast_retry
):
    file_server.add("/m/HIGGS.csv.gz", higgs_sample_bytes)
    monkeypatch.setattr(
        official, "HIGGS_SHA256", "sha256:" + hashlib.sha256(higgs_sample_bytes).hexdigest()
    )
    params = HiggsParams(
        source="mirror",
        mirror=file_server.base_url + "/m",
        size="full",
        test_rows=1000,
        train_rows=8000,
    )
    fetch_higgs(params, tmp_path / "raw", fast_retry)
    manifest = split_higgs(params, tmp_path / "raw", tmp_path / "out")
    assert manifest["splits"]["train"]["rows"] == 8000
    assert manifest["splits"]["test"]["first_row"] == 10984 - 1000


def test_official_defaults_follow_the_classic_protocol():
    study = HiggsParams(source="uci")
    assert study.resolved_train_rows() == 10_000 and study.head_rows() == 12_000
    full = HiggsParams(source="uci", size="full")
    # The whole file: training is every row between validation and the last 500,000.
    assert full.resolved_train_rows() is None
    assert full.resolved_test_rows() == 500_000
    assert HiggsParams().resolved_train_rows() is None  # embedded: all between


def test_mirror_without_location_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    with pytest.raises(FitscopeError, match=r"Fix: set data\.higgs\.mirror in params\.yaml"):
        fetch_higgs(HiggsParams(source="mirror"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_mirror_env_var_alone_is_refused_naming_the_parameter(tmp_path, monkeypatch):
    # DVC cannot see environment variables: a mirror given that way would not re-run the
    # fetch when it changes, so the parameter is the only way.
    monkeypatch.setenv(MIRROR_ENV, "/srv/mirror")
    with pytest.raises(FitscopeError) as err:
        fetch_mnist(MnistParams(source="mirror"), tmp_path)
    assert str(err.value).endswith("Fix: set data.mnist.mirror: /srv/mirror in params.yaml")
    assert "<dataset>" not in str(err.value)


def test_mirror_with_unknown_url_scheme_is_refused_at_parameter_time():
    with pytest.raises(FitscopeError, match=r"^unsupported URL scheme 'htp' in 'htp://host/m'"):
        higgs_params({"higgs": {"source": "mirror", "mirror": "htp://host/m"}})


def test_split_larger_than_source_is_refused(tmp_path):
    params = HiggsParams(train_rows=10_000)  # 1,000 + 10,000 + 1,000 > 10,984
    fetch_higgs(params, tmp_path / "raw")
    with pytest.raises(FitscopeError, match=r"but .* has 10984\. Fix: lower"):
        split_higgs(params, tmp_path / "raw", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("1.0,2.0,3.0", r"HIGGS.csv.gz:3: expected 29 columns, found 3"),
        ("1.0," + ",".join(["abc"] + ["0.5"] * 27), r"HIGGS.csv.gz:3: column 2 is not a number"),
    ],
)
def test_bad_csv_row_reports_file_and_line(tmp_path, higgs_sample_bytes, line, message):
    lines = gzip.decompress(higgs_sample_bytes).splitlines()[:5]
    lines[2] = line.encode()
    path = tmp_path / "HIGGS.csv.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(FitscopeError, match=message):
        read_higgs_csv(path)


def test_truncated_gzip_file_is_refused(tmp_path, higgs_sample_bytes):
    path = tmp_path / "HIGGS.csv.gz"
    path.write_bytes(higgs_sample_bytes[:100_000])
    with pytest.raises(FitscopeError, match="not a complete gzip file"):
        read_higgs_csv(path)


def test_label_outside_0_1_is_refused(tmp_path):
    path = tmp_path / "HIGGS.csv.gz"
    path.write_bytes(gzip.compress(("2.0," + ",".join(["0.5"] * 28) + "\n").encode()))
    with pytest.raises(FitscopeError, match=":1: label must be 0 or 1"):
        read_higgs_csv(path)


def test_embedded_mnist_split_is_balanced_and_disjoint(tmp_path):
    params = MnistParams(val_size=50, test_size=200)
    fetch_mnist(params, tmp_path / "raw")
    manifest = split_mnist(params, tmp_path / "raw", tmp_path / "out")
    assert manifest["splits"]["val"]["class_counts"] == {str(d): 5 for d in range(10)}
    assert manifest["splits"]["test"]["class_counts"] == {str(d): 20 for d in range(10)}
    x_tr, y_tr = load_split(tmp_path / "out", "train")
    x_va, _ = load_split(tmp_path / "out", "val")
    x_te, _ = load_split(tmp_path / "out", "test")
    assert len(y_tr) == 5000 - 250
    # Every prefix of the training pool is stratified: the first 300 hold 30 of each digit.
    assert np.bincount(y_tr[:300], minlength=10).tolist() == [30] * 10
    assert x_tr.min() >= 0.0 and x_tr.max() <= 1.0 and x_tr.shape[1] == 784
    rows = {r.tobytes() for r in np.asarray(x_tr)}
    assert not any(r.tobytes() in rows for r in np.asarray(x_va))
    assert not any(r.tobytes() in rows for r in np.asarray(x_te))
    again = split_mnist(params, tmp_path / "raw", tmp_path / "out2")
    assert again["splits"] == manifest["splits"]
    np.testing.assert_array_equal(load_split(tmp_path / "out2", "train")[1], y_tr)


def test_official_mnist_over_http_with_mirror_fallback(
    tmp_path, file_server, mnist_idx_dir, monkeypatch, fast_retry
):
    serve_mnist(file_server, mnist_idx_dir, "/good/", monkeypatch)
    monkeypatch.setattr(
        official,
        "MNIST_MIRRORS",
        (file_server.base_url + "/dead/", file_server.base_url + "/good/"),
    )
    params = MnistParams(source="official", val_size=60, test_size=None)
    info = fetch_mnist(params, tmp_path / "raw", fast_retry)
    assert all("/good/" in url for url in info["urls"].values())
    manifest = split_mnist(params, tmp_path / "raw", tmp_path / "out")
    assert {k: v["rows"] for k, v in manifest["splits"].items()} == {
        "train": 540,
        "val": 60,
        "test": 200,
    }


def test_official_mnist_md5_mismatch(tmp_path, file_server, mnist_idx_dir, monkeypatch, fast_retry):
    for name in MNIST_FILES:
        file_server.add(f"/m/{name}", (mnist_idx_dir / name).read_bytes())
    monkeypatch.setattr(official, "MNIST_MIRRORS", (file_server.base_url + "/m/",))
    with pytest.raises(FitscopeError, match="checksum mismatch"):
        fetch_mnist(MnistParams(source="official"), tmp_path / "raw", fast_retry)


def test_idx_bad_magic_and_bad_size(tmp_path):
    bad_magic = tmp_path / "a.gz"
    bad_magic.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc"))
    with pytest.raises(FitscopeError, match="bad IDX magic number 00000d01"):
        read_idx(bad_magic, ndim=1)
    short = tmp_path / "b.gz"
    short.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc"))
    with pytest.raises(FitscopeError, match=r"declares dimensions \(5,\).*holds 3 bytes"):
        read_idx(short, ndim=1)


def test_idx_round_trip(tmp_path):
    arr = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    write_idx(tmp_path / "x.gz", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.gz", ndim=3), arr)
    # Reproducible bytes: the same array gives the same file (DVC hashes stay stable).
    write_idx(tmp_path / "y.gz", arr)
    assert (tmp_path / "x.gz").read_bytes() == (tmp_path / "y.gz").read_bytes()


def test_images_and_labels_count_mismatch(tmp_path, mnist_idx_dir):
    raw = tmp_path / "raw"
    raw.mkdir()
    imgs = read_idx(mnist_idx_dir / "train-images-idx3-ubyte.gz", ndim=3)
    labels = read_idx(mnist_idx_dir / "train-labels-idx1-ubyte.gz", ndim=1)
    write_idx(raw / "train-images-idx3-ubyte.gz", imgs)
    write_idx(raw / "train-labels-idx1-ubyte.gz", labels[:-1])
    with pytest.raises(FitscopeError, match=r"600 images .* vs 599 labels"):
        split_mnist(MnistParams(), raw, tmp_path / "out")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"higgs": {"source": "kaggle"}}, "data.higgs.source='kaggle' is not valid"),
        ({"higgs": {"val_rows": 0}}, "data.higgs.val_rows=0 must be >= 1"),
        ({"higgs": {"rows": 5}}, r"unknown key\(s\) \['rows'\] in data.higgs"),
        ({"mnist": {"val_size": -3}}, "data.mnist.val_size=-3 must be >= 1"),
    ],
)
def test_bad_params_are_refused(bad, message):
    with pytest.raises(FitscopeError, match=message):
        higgs_params(bad)
        mnist_params(bad)


def test_cli_prints_one_line_error_and_exits_nonzero(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  higgs:\n    source: kaggle\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fitscope.cli", "fetch", "higgs"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fitscope: error: data.higgs.source='kaggle' is not valid. "
        "Fix: use one of ['embedded', 'uci', 'mirror']"
    ]
    assert not (tmp_path / "data").exists()


def test_fill_mirror_then_use_it_as_a_directory_source(
    tmp_path, file_server, mnist_idx_dir, monkeypatch, fast_retry
):
    md5s = serve_mnist(file_server, mnist_idx_dir, "/mnist/", monkeypatch)
    monkeypatch.setattr(official, "MNIST_MIRRORS", (file_server.base_url + "/mnist/",))
    written = fill_mirror(tmp_path / "mirror", ("mnist",), fast_retry)
    assert sorted(p.name for p in written) == sorted([*md5s, CHECKSUMS_FILE])
    sums = json.loads((tmp_path / "mirror" / CHECKSUMS_FILE).read_text())["files"]
    assert sorted(sums) == sorted(md5s)
    for name, entry in sums.items():
        body = (tmp_path / "mirror" / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(body).hexdigest(), "bytes": len(body)}
    params = MnistParams(source="mirror", mirror=str(tmp_path / "mirror"), test_size=None)
    file_server.requests.clear()
    fetch_mnist(params, tmp_path / "raw", fast_retry)
    assert file_server.requests == []  # a directory mirror needs no network
    manifest = split_mnist(params, tmp_path / "raw", tmp_path / "out")
    assert manifest["splits"]["test"]["rows"] == 200


# --- every fetched byte verified (issue 11) ------------------------------------------------------
SMALL = {"val_rows": 500, "train_rows": 2000, "test_rows": 300}  # a 2,800-row head


def head_text(body: bytes, n: int) -> bytes:
    return b"".join(line + b"\n" for line in gzip.decompress(body).split(b"\n")[:n])


def uci_params(monkeypatch, *urls: str, **overrides) -> HiggsParams:
    monkeypatch.setattr(official, "HIGGS_URLS", urls)
    return HiggsParams(source="uci", **{**SMALL, **overrides})


def assert_nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


def test_streamed_head_records_its_sha256_and_a_pin_is_enforced(
    tmp_path, file_server, higgs_sample_bytes, monkeypatch, fast_retry
):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    want = hashlib.sha256(head_text(higgs_sample_bytes, 2800)).hexdigest()
    info = fetch_higgs(uci_params(monkeypatch, url), tmp_path / "a", fast_retry)
    assert (info["rows"], info["head_sha256"], info["verified_by"]) == (2800, want, [])
    on_disk = json.loads((tmp_path / "a" / "source.json").read_text())
    assert on_disk["head_sha256"] == want  # so dvc.lock (the outs hash) changes with the data
    pinned = uci_params(monkeypatch, url, head_sha256=want)
    assert fetch_higgs(pinned, tmp_path / "b", fast_retry)["verified_by"] == [
        "data.higgs.head_sha256"
    ]
    other = uci_params(monkeypatch, url, head_sha256="0" * 64)
    with pytest.raises(FitscopeError) as err:
        fetch_higgs(other, tmp_path / "c", fast_retry)
    msg = str(err.value)
    assert "upstream changed or corrupted" in msg and "\n" not in msg
    assert f"pin the new value: data.higgs.head_sha256: {want}" in msg
    assert_nothing_written(tmp_path / "c")


def test_silent_flip_is_refused_by_the_pin_and_the_next_url_is_used(
    tmp_path, file_server, higgs_sample_bytes, monkeypatch, fast_retry
):
    good = higgs_gzip(higgs_sample_bytes, 6000)
    flipped = flip_silently(good, 2800)
    bad_url = file_server.add("/a/HIGGS.csv.gz", flipped)
    good_url = file_server.add("/b/HIGGS.csv.gz", good)
    pin = hashlib.sha256(head_text(good, 2800)).hexdigest()
    # Unpinned, the flip passes every row check: only its recorded sha256 differs.
    info = fetch_higgs(uci_params(monkeypatch, bad_url), tmp_path / "a", fast_retry)
    assert info["head_sha256"] != pin
    with pytest.raises(FitscopeError, match="upstream changed or corrupted"):
        fetch_higgs(uci_params(monkeypatch, bad_url, head_sha256=pin), tmp_path / "b", fast_retry)
    assert_nothing_written(tmp_path / "b")
    params = uci_params(monkeypatch, bad_url, good_url, head_sha256=pin)
    info = fetch_higgs(params, tmp_path / "c", fast_retry)
    assert info["url"] == good_url and info["head_sha256"] == pin


@pytest.fixture
def higgs_mirror(tmp_path, higgs_sample_bytes) -> Path:
    """A directory mirror holding a 6,000-row HIGGS.csv.gz and its checksums.json."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / HIGGS_FILE).write_bytes(higgs_gzip(higgs_sample_bytes, 6000))
    write_mirror_checksums(mirror)
    return mirror


def test_mirror_checksums_refuse_a_flipped_head(tmp_path, file_server, higgs_mirror, fast_retry):
    good = (higgs_mirror / HIGGS_FILE).read_bytes()
    checksums = (higgs_mirror / CHECKSUMS_FILE).read_bytes()
    file_server.add("/bad/HIGGS.csv.gz", flip_silently(good, 2800))
    file_server.add("/bad/checksums.json", checksums)
    params = HiggsParams(source="mirror", mirror=file_server.base_url + "/bad", **SMALL)
    with pytest.raises(FitscopeError) as err:
        fetch_higgs(params, tmp_path / "out", fast_retry)
    assert "do not match the mirror's checksums" in str(err.value)
    assert str(err.value).endswith(
        "Fix: check data.higgs.mirror (`fitscope mirror` makes one, with its checksums)"
    )
    assert_nothing_written(tmp_path / "out")
    file_server.add("/good/HIGGS.csv.gz", good)
    file_server.add("/good/checksums.json", checksums)
    params = HiggsParams(source="mirror", mirror=file_server.base_url + "/good", **SMALL)
    info = fetch_higgs(params, tmp_path / "out", fast_retry)
    assert info["verified_by"] == ["mirror checksums.json"]
    assert gzip.decompress((tmp_path / "out" / HIGGS_FILE).read_bytes()) == head_text(good, 2800)


def test_mirror_without_checksums_is_refused_unless_pinned(tmp_path, higgs_mirror, fast_retry):
    (higgs_mirror / CHECKSUMS_FILE).unlink()
    params = HiggsParams(source="mirror", mirror=str(higgs_mirror), **SMALL)
    with pytest.raises(FitscopeError) as err:
        fetch_higgs(params, tmp_path / "out", fast_retry)
    msg = str(err.value)
    want = hashlib.sha256(head_text((higgs_mirror / HIGGS_FILE).read_bytes(), 2800))
    assert "no usable checksums.json" in msg and "cannot be verified" in msg
    assert f"pin data.higgs.head_sha256: {want.hexdigest()}" in msg
    assert_nothing_written(tmp_path / "out")
    pinned = HiggsParams(
        source="mirror", mirror=str(higgs_mirror), head_sha256=want.hexdigest(), **SMALL
    )
    assert fetch_higgs(pinned, tmp_path / "out", fast_retry)["verified_by"] == [
        "data.higgs.head_sha256"
    ]


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (",".join(["1.0"] * 28), "line 3: expected 29 columns, found 28"),
        ("2.0," + ",".join(["0.5"] * 28), "line 3: label must be 0 or 1, found 2"),
        ("1.0,nan," + ",".join(["0.5"] * 27), "line 3: column 2 is not a finite number (nan)"),
        ("0.0," + ",".join(["0.5"] * 27) + ",inf", "line 3: column 29 is not a finite number"),
        ("", "line 3: empty line"),
        ("1.0,," + ",".join(["0.5"] * 27), "line 3: column 2 is not a number ('')"),
        ("1.0,0.9x," + ",".join(["0.5"] * 27), "line 3: column 2 is not a number ('0.9x')"),
    ],
)
def test_rows_are_validated_inside_the_fetch(
    tmp_path, file_server, higgs_sample_bytes, monkeypatch, fast_retry, row, problem
):
    lines = gzip.decompress(higgs_sample_bytes).split(b"\n")[:2800]
    lines[2] = row.encode()
    bad_url = file_server.add("/a/HIGGS.csv.gz", gzip.compress(b"\n".join(lines) + b"\n"))
    good_url = file_server.add("/b/HIGGS.csv.gz", higgs_sample_bytes)
    with pytest.raises(FitscopeError) as err:
        fetch_higgs(uci_params(monkeypatch, bad_url), tmp_path / "out", fast_retry)
    assert f"{bad_url}: {problem}" in str(err.value) and "\n" not in str(err.value)
    # Nothing is written, so DVC has nothing to record or cache.
    assert_nothing_written(tmp_path / "out")
    info = fetch_higgs(uci_params(monkeypatch, bad_url, good_url), tmp_path / "out")
    assert info["url"] == good_url


@pytest.mark.parametrize("value", ["abc", "A" * 64, 123])
def test_bad_head_sha256_is_refused(value):
    with pytest.raises(FitscopeError, match=r"data\.higgs\.head_sha256=.* is not a sha256"):
        higgs_params({"higgs": {"source": "uci", "head_sha256": value}})


def test_head_sha256_without_a_streamed_head_is_refused():
    with pytest.raises(FitscopeError, match=r"Fix: set data\.higgs\.head_sha256 to null"):
        higgs_params({"higgs": {"source": "embedded", "head_sha256": "0" * 64}})


@pytest.mark.parametrize(
    ("dataset", "file"), [("higgs", "HIGGS.csv.gz"), ("mnist", "train-images-idx3-ubyte.gz")]
)
def test_split_without_its_raw_file_says_not_found(tmp_path, dataset, file):
    raw = tmp_path / "raw"
    raw.mkdir()
    split = split_higgs if dataset == "higgs" else split_mnist
    params = HiggsParams() if dataset == "higgs" else MnistParams()
    with pytest.raises(FitscopeError) as err:
        split(params, raw, tmp_path / "out")
    assert str(err.value) == f"{raw / file} not found. Fix: run `dvc repro fetch_{dataset}`"
    (raw / file).write_bytes(b"")
    with pytest.raises(FitscopeError, match=rf"{file} is empty\. Fix: fetch it again"):
        split(params, raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_non_finite_value_in_a_raw_file_is_refused(tmp_path, higgs_sample_bytes):
    lines = gzip.decompress(higgs_sample_bytes).split(b"\n")[:10]
    lines[4] = b"1.0,-inf," + b",".join([b"0.5"] * 27)
    (tmp_path / "HIGGS.csv.gz").write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    with pytest.raises(FitscopeError, match=r"HIGGS\.csv\.gz:5: column 2 is not a finite number"):
        read_higgs_csv(tmp_path / "HIGGS.csv.gz")


def test_fill_mirror_publishes_block_checksums_the_mirror_source_verifies(
    tmp_path, file_server, higgs_sample_bytes, monkeypatch, fast_retry
):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    monkeypatch.setattr(official, "HIGGS_URLS", (url,))
    monkeypatch.setattr(
        official, "HIGGS_SHA256", "sha256:" + hashlib.sha256(higgs_sample_bytes).hexdigest()
    )
    fill_mirror(tmp_path / "mirror", ("higgs",), fast_retry)
    entry = json.loads((tmp_path / "mirror" / CHECKSUMS_FILE).read_text())["files"][HIGGS_FILE]
    assert entry["lines"] == 10_984 and entry["block_lines"] == 1000
    assert len(entry["block_sha256"]) == 11
    assert entry["sha256"] == hashlib.sha256(higgs_sample_bytes).hexdigest()
    params = HiggsParams(source="mirror", mirror=str(tmp_path / "mirror"), **SMALL)
    info = fetch_higgs(params, tmp_path / "raw", fast_retry)
    assert info["verified_by"] == ["mirror checksums.json"]
    assert split_higgs(params, tmp_path / "raw", tmp_path / "out")["splits"]["val"]["rows"] == 500


def cli(args: list[str], cwd: Path, env: dict[str, str] | None = None):
    return subprocess.run(
        [sys.executable, "-m", "fitscope.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )


def test_cli_mirror_fills_the_directory_the_fetch_reads(tmp_path, higgs_mirror, monkeypatch):
    (higgs_mirror / CHECKSUMS_FILE).unlink()
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    (tmp_path / "params.yaml").write_text(
        "data:\n  higgs:\n    source: mirror\n    mirror: mirror\n    val_rows: 500\n"
        "    train_rows: 2000\n    test_rows: 300\n"
    )
    # `fitscope mirror` (no --dir) writes where data.higgs.mirror points.
    proc = cli(["mirror", "--checksums-only", "--datasets", "higgs"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (higgs_mirror / CHECKSUMS_FILE).is_file()
    assert "-S data.higgs.mirror=mirror" in proc.stdout
    proc = cli(["fetch", "higgs"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    want = hashlib.sha256(head_text((higgs_mirror / HIGGS_FILE).read_bytes(), 2800))
    assert f"the first 2800 rows have sha256 {want.hexdigest()} (pin it" in proc.stdout
    # The environment variable is no longer read: refused with the keys to set instead.
    proc = cli(["mirror", "--checksums-only"], tmp_path, env={MIRROR_ENV: "/srv/m"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fitscope: error: FITSCOPE_MIRROR is set, but fitscope reads mirror locations only "
        "from --dir and data.higgs.mirror and data.mnist.mirror (DVC cannot see environment "
        "variables). Fix: pass --dir /srv/m and set data.higgs.mirror and data.mnist.mirror: "
        "/srv/m in params.yaml"
    ]


# --- split arrays verified before any run exists (issue 11) --------------------------------------
def _save(name: str, change):
    """A tamper step: load ``name`` from the split directory, change it, save it back."""

    def tamper(d: Path) -> None:
        array = np.load(d / name)
        np.save(d / name, change(array.copy()))

    return tamper


def _set(index, value):
    def change(a):
        a[index] = value
        return a

    return change


def _raw(name: str, edit):
    def tamper(d: Path) -> None:
        (d / name).write_bytes(edit((d / name).read_bytes()))

    return tamper


TAMPERED = {
    "garbage": (
        "higgs",
        "train",
        _raw("train_x.npy", lambda b: os.urandom(len(b))),
        "train_x.npy is not a valid .npy file",
    ),
    "empty": (
        "mnist",
        "val",
        _raw("val_x.npy", lambda b: b""),
        "val_x.npy is empty",
    ),
    "truncated": (
        "higgs",
        "test",
        _raw("test_x.npy", lambda b: b[: len(b) // 2]),
        "test_x.npy is not a valid .npy file",
    ),
    "27 columns": (
        "higgs",
        "train",
        _save("train_x.npy", lambda a: a[:, :27]),
        "train_x.npy holds float32 (8984, 27) but manifest.json records float32 (8984, 28)",
    ),
    "length mismatch": (
        "higgs",
        "train",
        _save("train_y.npy", lambda a: a[:-1]),
        "train_y.npy holds int64 (8983,) but manifest.json records int64 (8984,)",
    ),
    "1-D": (
        "higgs",
        "val",
        _save("val_x.npy", lambda a: a.ravel()),
        "val_x.npy holds float32 (28000,) but manifest.json records float32 (1000, 28)",
    ),
    "float64": (
        "higgs",
        "val",
        _save("val_x.npy", lambda a: a.astype(np.float64)),
        "val_x.npy holds float64 (1000, 28) but manifest.json records float32",
    ),
    "label 2": (
        "higgs",
        "val",
        _save("val_y.npy", _set(5, 2)),
        "val_y.npy holds label 2 at row 5, outside 0..1",
    ),
    "label 10": (
        "mnist",
        "train",
        _save("train_y.npy", _set(7, 10)),
        "train_y.npy holds label 10 at row 7, outside 0..9",
    ),
    "NaN": (
        "higgs",
        "train",
        _save("train_x.npy", _set((3, 4), np.nan)),
        "train_x.npy holds non-finite features (NaN or Inf; 1 in rows 0-8983, the first at "
        "row 3, column 4)",
    ),
    "Inf": (
        "mnist",
        "test",
        _save("test_x.npy", _set((9, 0), -np.inf)),
        "test_x.npy holds non-finite features",
    ),
    "plausible value": (
        "higgs",
        "test",
        _save("test_x.npy", _set((0, 0), 0.5)),
        "test_x.npy differs from the sha256 in manifest.json",
    ),
}


@pytest.fixture
def split_copy(tmp_path, processed_dir):
    """A private copy of one dataset's split directory, under ``tmp_path/processed``."""

    def make(dataset: str) -> Path:
        return Path(shutil.copytree(processed_dir / dataset, tmp_path / "processed" / dataset))

    return make


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_split_array_is_a_one_line_error_naming_the_file(split_copy, case):
    dataset, split, tamper, message = TAMPERED[case]
    d = split_copy(dataset)
    tamper(d)
    with pytest.raises(FitscopeError) as err:
        load_split(d, split)
    msg = str(err.value)
    assert f"{d}/{message}" in msg and "\n" not in msg
    assert msg.endswith(f"Fix: rebuild the split with `dvc repro -f -s split_{dataset}`")


def test_manifest_records_shape_dtype_and_sha256_of_every_array(processed_dir):
    manifest = json.loads((processed_dir / "higgs" / "manifest.json").read_text())
    assert manifest["num_classes"] == 2
    train = manifest["splits"]["train"]
    assert {"rows", "features", "class_counts", "first_row"} <= set(train)  # kept keys
    assert train["arrays"]["x"] == {
        "file": "train_x.npy",
        "shape": [8984, 28],
        "dtype": "float32",
        "sha256": hashlib.sha256(
            (processed_dir / "higgs" / "train_x.npy").read_bytes()
        ).hexdigest(),
    }
    assert train["arrays"]["y"]["shape"] == [8984] and train["arrays"]["y"]["dtype"] == "int64"


def test_old_or_missing_manifest_is_refused(split_copy):
    d = split_copy("mnist")
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["splits"]["val"]["arrays"]  # as written before arrays were recorded
    (d / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FitscopeError, match=r"has no verifiable val split .* split_mnist`$"):
        load_split(d, "val")
    (d / "manifest.json").unlink()
    with pytest.raises(FitscopeError, match=r"no data split in .* \(no manifest\.json\)"):
        load_split(d, "train")


def test_datamodule_and_evaluate_loader_verify_too(split_copy):
    import torch

    d = split_copy("higgs")
    TAMPERED["NaN"][2](d)
    with pytest.raises(FitscopeError, match=r"train_x\.npy holds non-finite features"):
        ArrayDataModule(d, task="binary", batch_size=100).setup()
    with pytest.raises(FitscopeError, match=r"train_x\.npy holds non-finite features"):
        split_tensors(d, "train", "binary", train_size=10)  # what test scoring loads
    x, y = split_tensors(d, "test", "binary")  # untouched splits still load
    assert x.shape == (1000, 28) and y.dtype == torch.float32


def test_binary_task_on_a_multiclass_split_is_refused(processed_dir):

    dm = ArrayDataModule(processed_dir / "mnist", task="binary", batch_size=100)
    with pytest.raises(FitscopeError, match=r"data\.task=binary needs labels 0/1, but .* mnist"):
        dm.setup()


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_train_on_a_tampered_split_exits_2_before_any_mlflow_run(split_copy, tmp_path, mlflow_uri):
    d = split_copy("higgs")
    TAMPERED["NaN"][2](d)
    proc = run_train([f"data.dir={d}", "trainer=debug", "study=t_bad_data"], tmp_path, mlflow_uri)
    line = last_error_line(proc, 2)
    assert line.startswith(f"fitscope: error: {d}/train_x.npy holds non-finite features")
    assert [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()] == [line]
    assert not (tmp_path / "mlflow.db").exists()  # no store, so no run, FAILED or otherwise
    assert list(tmp_path.rglob("model.pt")) == [] and list(tmp_path.rglob("metrics.json")) == []


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_splits_that_disagree_are_refused_before_any_run(split_copy, tmp_path, mlflow_uri):
    # A 27-column train split whose manifest entry was rewritten to match it, beside the
    # 28-column val and test splits: each array agrees with its own entry.
    d = split_copy("higgs")
    _save("train_x.npy", lambda a: a[:, :27])(d)
    manifest = json.loads((d / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["arrays"]["x"]
    entry["shape"][1] = 27
    entry["sha256"] = sha256_file(d / "train_x.npy")
    (d / "manifest.json").write_text(json.dumps(manifest))

    proc = run_train([f"data.dir={d}", "trainer=debug", "study=t_disagree"], tmp_path, mlflow_uri)
    line = last_error_line(proc, 2)
    assert line == (
        f"fitscope: error: the splits in {d} disagree: test, val: 28 features of float32, "
        "labels int64; train: 27 features of float32, labels int64. Fix: rebuild the split "
        "with `dvc repro -f -s split_higgs`"
    )
    assert not (tmp_path / "mlflow.db").exists()
    assert list(tmp_path.rglob("model.pt")) == [] and list(tmp_path.rglob("metrics.json")) == []
