"""Property-based: malformed data files end in a one-line FitscopeError or a correct result.

Random bit flips and truncations of a small real HIGGS gzip (as a raw file and as a
mirror's file) and of split ``.npy`` files. Never another exception, never a
half-written output, never silently different data.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import higgs_gzip
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fitscope.core.errors import FitscopeError
from fitscope.data.download import RetryPolicy
from fitscope.data.higgs import fetch_higgs, split_higgs
from fitscope.data.mirror import write_mirror_checksums
from fitscope.data.official import CHECKSUMS_FILE, HIGGS_FILE
from fitscope.data.params import HiggsParams
from fitscope.data.splits import load_split

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# A mutation: up to three (position, xor mask) flips, or a truncation; positions wrap.
flips = st.lists(st.tuples(st.integers(0, 1 << 30), st.integers(1, 255)), min_size=1, max_size=3)
mutations = st.one_of(
    st.tuples(st.just("flip"), flips), st.tuples(st.just("truncate"), st.integers(0, 1 << 30))
)


def mutate(body: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "truncate":
        return body[: arg % len(body)]
    out = bytearray(body)
    for pos, mask in arg:
        out[pos % len(out)] ^= mask
    return bytes(out)


def assert_one_line(err: FitscopeError) -> None:
    msg = str(err)
    assert msg and "\n" not in msg and "Fix:" in msg, msg


def files_in(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.exists() else []


SPLIT = HiggsParams(val_rows=50, train_rows=150, test_rows=50)  # of a 300-row file


@pytest.fixture(scope="module")
def small_higgs(higgs_sample_bytes, tmp_path_factory):
    """A 300-row real HIGGS gzip and its correct split (the reference)."""
    root = tmp_path_factory.mktemp("small_higgs")
    body = higgs_gzip(higgs_sample_bytes, 300)
    (root / "raw").mkdir()
    (root / "raw" / HIGGS_FILE).write_bytes(body)
    split_higgs(SPLIT, root / "raw", root / "split")
    return root / "raw" / HIGGS_FILE, root / "split"


@SETTINGS
@given(mutation=mutations)
@example(mutation=("flip", [(4, 0xFF)]))  # the gzip header's mtime: same content
@example(mutation=("truncate", 100))
def test_mutated_raw_higgs_splits_correctly_or_is_refused(small_higgs, mutation):
    body, reference = small_higgs[0].read_bytes(), small_higgs[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        raw.mkdir()
        (raw / HIGGS_FILE).write_bytes(mutate(body, mutation))
        try:
            split_higgs(SPLIT, raw, out)
        except FitscopeError as err:
            assert_one_line(err)
            assert files_in(out) == []  # nothing half-written
            return
        for split in ("train", "val", "test"):
            for got, want in zip(load_split(out, split), load_split(reference, split), strict=True):
                np.testing.assert_array_equal(got, want)


@pytest.fixture(scope="module")
def mirror_file(higgs_sample_bytes, tmp_path_factory):
    """A 2,500-row real HIGGS gzip and the checksums.json a mirror publishes for it."""
    root = tmp_path_factory.mktemp("mirror")
    body = higgs_gzip(higgs_sample_bytes, 2500)
    (root / HIGGS_FILE).write_bytes(body)
    write_mirror_checksums(root)
    return root


HEAD = {"val_rows": 200, "train_rows": 800, "test_rows": 200}  # 1,200 rows: 2 blocks read


@SETTINGS
@given(mutation=mutations)
@example(mutation=("flip", [(2_000_000_000 % 600_000, 0x01)]))
@example(mutation=("truncate", 5))
def test_mutated_mirror_head_is_exact_or_refused(mirror_file, mutation):
    body = (mirror_file / HIGGS_FILE).read_bytes()
    checksums = (mirror_file / CHECKSUMS_FILE).read_bytes()
    want = b"".join(line + b"\n" for line in gzip.decompress(body).split(b"\n")[:1200])
    with tempfile.TemporaryDirectory() as tmp:
        mirror, out = Path(tmp) / "mirror", Path(tmp) / "out"
        mirror.mkdir()
        (mirror / HIGGS_FILE).write_bytes(mutate(body, mutation))
        (mirror / CHECKSUMS_FILE).write_bytes(checksums)
        params = HiggsParams(source="mirror", mirror=str(mirror), **HEAD)
        try:
            fetch_higgs(params, out, RetryPolicy(attempts=1))
        except FitscopeError as err:
            assert_one_line(err)
            assert files_in(out) == []
            return
        assert gzip.decompress((out / HIGGS_FILE).read_bytes()) == want


@SETTINGS
@given(
    name=st.sampled_from([f"{s}_{p}.npy" for s in ("train", "val", "test") for p in "xy"]),
    mutation=mutations,
)
@example(name="val_y.npy", mutation=("flip", [(0, 1), (0, 1)]))  # cancels out: loads fine
def test_mutated_split_array_is_refused_unless_unchanged(small_higgs, name, mutation):
    _, reference = small_higgs
    split = name.split("_")[0]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "higgs"
        d.mkdir()
        for f in reference.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        original = (reference / name).read_bytes()
        mutated = mutate(original, mutation)
        (d / name).write_bytes(mutated)
        before = {p: p.read_bytes() for p in files_in(d)}
        try:
            loaded = load_split(d, split)
        except FitscopeError as err:
            assert_one_line(err)
            assert name in str(err)
        else:  # only a mutation that cancels itself out (the same flip twice) may load
            assert mutated == original
            for got, want in zip(loaded, load_split(reference, split), strict=True):
                np.testing.assert_array_equal(got, want)
        assert {p: p.read_bytes() for p in files_in(d)} == before  # loading writes nothing
