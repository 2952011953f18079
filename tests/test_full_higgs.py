"""Full-size HIGGS on a small synthetic file of the real layout: the one-pass split into
memory-mapped arrays, its refusals, the chunked datamodule and a training run on it."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import compose, last_error_line, run_train

from fitscope.core.errors import FitscopeError
from fitscope.data import official
from fitscope.data.higgs import fetch_higgs, split_higgs
from fitscope.data.official import CHECKSUMS_FILE, HIGGS_FILE
from fitscope.data.params import HiggsParams
from fitscope.data.splits import load_split
from fitscope.data.synthetic import write_synthetic_higgs
from fitscope.pipeline.identity import run_config
from fitscope.training.datamodule import ArrayDataModule, ChunkBatches

ROWS = 20_000
SIZES = {"val_rows": 1000, "test_rows": 2000}  # training: the 17,000 rows in between


@pytest.fixture(scope="module")
def synthetic_mirror(tmp_path_factory):
    """A 20,000-row synthetic HIGGS.csv.gz with its checksums.json (`fitscope synth-higgs`)."""
    root = tmp_path_factory.mktemp("synthetic")
    proc = fitscope_cli(["synth-higgs", str(root), "--rows", str(ROWS), "--seed", "1"], root)
    assert proc.returncode == 0, proc.stderr
    return root


def fitscope_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fitscope.cli", *args], cwd=cwd, capture_output=True, text=True
    )


def test_synthetic_file_has_the_real_layout(synthetic_mirror, higgs_sample_bytes, tmp_path):
    number = re.compile(rb"-?\d\.\d{18}e[+-]\d{2}")  # %.18e, as the official file
    lines = gzip.decompress((synthetic_mirror / HIGGS_FILE).read_bytes()).split(b"\n")
    real = gzip.decompress(higgs_sample_bytes).split(b"\n", 1)[0].split(b",")
    assert lines[-1] == b"" and len(lines) == ROWS + 1
    for line in (lines[0], lines[ROWS // 2], lines[-2]):
        cells = line.split(b",")
        assert len(cells) == len(real) == 29 and all(number.fullmatch(c) for c in cells), line
        assert cells[0] in (b"0.000000000000000000e+00", b"1.000000000000000000e+00")
    entry = json.loads((synthetic_mirror / CHECKSUMS_FILE).read_text())["files"]
    assert entry[HIGGS_FILE]["lines"] == ROWS
    # Seeded: the same call writes the same bytes.
    write_synthetic_higgs(tmp_path / "again.csv.gz", ROWS, seed=1)
    assert (tmp_path / "again.csv.gz").read_bytes() == (synthetic_mirror / HIGGS_FILE).read_bytes()
    proc = fitscope_cli(["synth-higgs", str(tmp_path), "--rows", "0"], tmp_path)
    assert last_error_line(proc, 2) == (
        "fitscope: error: --rows 0 must be at least 1. Fix: e.g. --rows 20000"
    )


@pytest.fixture(scope="module")
def full_split(synthetic_mirror, tmp_path_factory):
    """The split of the synthetic file as `split_higgs` writes it with size=full."""
    root = tmp_path_factory.mktemp("full_split")
    (root / "raw").mkdir()
    (root / "raw" / HIGGS_FILE).write_bytes((synthetic_mirror / HIGGS_FILE).read_bytes())
    params = HiggsParams(source="mirror", size="full", mirror="unused", **SIZES)
    split_higgs(params, root / "raw", root / "higgs")
    return root / "higgs"


def serve(file_server, mirror, body: bytes | None = None) -> str:
    raw = (mirror / HIGGS_FILE).read_bytes()
    file_server.add("/m/HIGGS.csv.gz", raw if body is None else body)
    file_server.add("/m/checksums.json", (mirror / CHECKSUMS_FILE).read_bytes())
    return file_server.base_url + "/m"


def test_full_size_fetch_and_split_stream_into_verified_memmaps(
    tmp_path, file_server, synthetic_mirror, fast_retry, monkeypatch
):
    # Small blocks: the 20,000 rows arrive in ~150 blocks, as 11M rows do in ~500.
    monkeypatch.setattr(official, "HIGGS_BLOCK_BYTES", 100_000)
    params = HiggsParams(
        source="mirror", size="full", mirror=serve(file_server, synthetic_mirror), **SIZES
    )
    info = fetch_higgs(params, tmp_path / "raw", fast_retry)
    raw = tmp_path / "raw" / HIGGS_FILE
    assert info["verified_by"] == ["mirror checksums.json"]
    seen: list[int] = []
    manifest = split_higgs(params, tmp_path / "raw", tmp_path / "out", on_bytes=seen.append)
    assert sum(seen) == raw.stat().st_size  # the progress call site saw every byte once
    assert manifest["inputs_sha256"][HIGGS_FILE] == hashlib.sha256(raw.read_bytes()).hexdigest()
    splits = manifest["splits"]
    assert {k: (v["rows"], v["first_row"]) for k, v in splits.items()} == {
        "val": (1000, 0),
        "train": (17_000, 1000),
        "test": (2000, 18_000),
    }
    # A direct parse of the whole text (numpy, no fitscope code) is the reference.
    with gzip.open(raw) as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.float64).astype(np.float32)
    for name, (a, b) in {"val": (0, 1000), "train": (1000, 18_000), "test": (18_000, ROWS)}.items():
        x, y = load_split(tmp_path / "out", name)
        assert isinstance(x, np.memmap) and x.dtype == np.float32 and x.flags.c_contiguous
        np.testing.assert_array_equal(x, table[a:b, 1:])
        np.testing.assert_array_equal(y, table[a:b, 0].astype(np.int64))
        assert splits[name]["class_counts"] == {
            str(c): int(k) for c, k in enumerate(np.bincount(y)) if k
        }


def test_full_size_with_a_wrong_sha256_is_refused_and_nothing_is_written(
    tmp_path, file_server, synthetic_mirror, fast_retry
):
    params = HiggsParams(
        source="mirror",
        size="full",
        mirror=serve(file_server, synthetic_mirror),
        sha256="0" * 64,
        **SIZES,
    )
    with pytest.raises(FitscopeError) as err:
        fetch_higgs(params, tmp_path / "raw", fast_retry)
    message = str(err.value)
    assert "checksum mismatch (expected sha256:000" in message and "\n" not in message
    assert not list((tmp_path / "raw").glob("*"))


def corrupt_raw(tmp_path, synthetic_mirror, how: str) -> None:
    body = (synthetic_mirror / HIGGS_FILE).read_bytes()
    if how == "truncated":
        body = body[: len(body) * 3 // 4]
    else:  # one non-numeric cell deep inside the file (row 15,000)
        lines = gzip.decompress(body).split(b"\n")
        cells = lines[14_999].split(b",")
        cells[5] = b"0.5x"
        lines[14_999] = b",".join(cells)
        body = gzip.compress(b"\n".join(lines), compresslevel=1)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / HIGGS_FILE).write_bytes(body)


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("truncated", r"HIGGS\.csv\.gz is not a complete gzip file \(.*\)\. Fix: fetch it again"),
        ("non-numeric", r"HIGGS\.csv\.gz:15000: column 6 is not a number \('0\.5x'\)\. Fix:"),
    ],
)
def test_corrupt_full_file_is_refused_with_one_line_and_leaves_nothing(
    tmp_path, synthetic_mirror, monkeypatch, how, problem
):
    monkeypatch.setattr(official, "HIGGS_BLOCK_BYTES", 100_000)  # fails after blocks were written
    corrupt_raw(tmp_path, synthetic_mirror, how)
    params = HiggsParams(source="mirror", size="full", mirror="unused", **SIZES)
    with pytest.raises(FitscopeError, match=problem) as err:
        split_higgs(params, tmp_path / "raw", tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()  # no partial .npy, no temporary file


def epoch_rows(batches) -> np.ndarray:
    return np.concatenate([x[:, 0].numpy() for x, _ in batches])


def test_chunk_batches_yield_every_row_once_per_epoch_in_a_seeded_shuffled_order(tmp_path):
    n = 10_007  # not a multiple of the chunk or the batch size
    x = np.zeros((n, 28), dtype=np.float32)
    x[:, 0] = np.arange(n)  # each row carries its index
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", np.arange(n) % 2)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    ym = np.load(tmp_path / "y.npy", mmap_mode="r")

    def batches(seed: int, **kw) -> ChunkBatches:
        gen = __import__("torch").Generator().manual_seed(seed)
        return ChunkBatches(xm, ym, 256, 1000, binary=True, generator=gen, **kw)

    one = batches(0)
    first, second = epoch_rows(one), epoch_rows(one)
    for order in (first, second):
        assert np.array_equal(np.sort(order), np.arange(n))  # every row exactly once
    assert not np.array_equal(first, np.arange(n)) and not np.array_equal(first, second)
    assert np.array_equal(epoch_rows(batches(0)), first)  # seeded
    sizes = [len(y) for _, y in one]
    assert len(sizes) == len(one) and set(sizes[:-1]) == {256}
    for xb, yb in batches(3):  # labels travel with their rows, as float targets
        assert np.array_equal(yb.numpy(), xb[:, 0].numpy() % 2) and yb.dtype.is_floating_point
    # Two DDP ranks: the same order split between them, the same number of steps each.
    ranks = [list(batches(0, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(batches(0, world_size=2))
    both = np.concatenate([epoch_rows(ranks[0]), epoch_rows(ranks[1])])
    assert set(both.astype(int)) == set(range(n))


def test_datamodule_keeps_the_training_split_memory_mapped(full_split):
    dm = ArrayDataModule(full_split, task="binary", batch_size=500, chunk_rows=4000)
    dm.setup()
    assert isinstance(dm.mapped[0], np.memmap) and "train" not in dm.tensors
    assert dm.num_features == 28 and len(dm.train_dataloader()) == 34  # 17,000 / 500
    assert sum(len(y) for _, y in dm.train_dataloader()) == 17_000


@pytest.mark.slow
def test_debug_training_run_on_the_full_higgs_preset(full_split, tmp_path, mlflow_uri):
    proc = run_train(
        [
            f"paths.data_dir={full_split.parent}",
            "+profile=debug",
            "data=higgs_full",
            "data.chunk_rows=1500",
            "data.train_size=4000",  # 8 steps an epoch, 3 chunks: seconds, not the 17,000 rows
            "model=full",
            "study=t_full",
            "logger=none",
        ],
        tmp_path,
        mlflow_uri,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics_file = next(tmp_path.rglob("metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    assert metrics["epochs_run"] == 3 and metrics["n_params"] == 370_201, metrics  # 300x5
    assert np.isfinite(metrics["best_val_loss"])
    config = (metrics_file.parent / ".hydra" / "config.yaml").read_text()
    assert "chunk_rows: 1500" in config


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_chunk_rows_below_the_batch_size_is_a_one_line_error(full_split, tmp_path, mlflow_uri):
    proc = run_train(
        [f"paths.data_dir={full_split.parent}", "data=higgs_full", "data.chunk_rows=10"],
        tmp_path,
        mlflow_uri,
    )
    assert "data.chunk_rows=10 is smaller than data.batch_size=1000" in last_error_line(proc, 2)


def test_chunk_rows_enters_the_config_hash_only_when_set():

    default = run_config(compose("paths.run_dir=unused"))
    assert "chunk_rows" not in default["data"]  # hashes of existing runs are unchanged
    full = run_config(compose("paths.run_dir=unused", "data=higgs_full", "model=full"))
    assert full["data"]["chunk_rows"] == 100_000 and full["data"]["batch_size"] == 1000
    assert full["model"] == {
        "name": "full",
        "width": 300,
        "depth": 5,
        "activation": "tanh",
        "init": "glorot_uniform",
    }
