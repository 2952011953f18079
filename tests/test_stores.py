"""Tracking stores and output folders that cannot be used: found before training, one line."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest
from conftest import last_error_line, run_train, runs_of

from fitscope.tracking.store import HTTP_LIMITS, ServerUnreachable, get_client


def debug_args(processed_dir, *extra):
    return [f"paths.data_dir={processed_dir}", "trainer=debug", "study=t_store", *extra]


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_read_only_store_is_refused_before_training(processed_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    get_client(uri)  # an existing store...
    subprocess.run(["chattr", "+i", str(tmp_path / "mlflow.db")], check=True)  # ...read-only
    try:
        proc = run_train(debug_args(processed_dir), tmp_path, uri)
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path / "mlflow.db")], check=True)
    line = last_error_line(proc, 2)
    assert line.startswith(f"fitscope: error: cannot use the MLflow tracking store {uri} (")
    assert "readonly database" in line and "Fix: make the file and its folder writable" in line
    assert "best epoch" not in proc.stderr  # nothing was trained


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_unwritable_store_path_is_refused_before_training(processed_dir, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"
    proc = run_train(debug_args(processed_dir), tmp_path, uri)
    line = last_error_line(proc, 2)
    assert line.startswith(f"fitscope: error: cannot use the MLflow tracking store {uri} (")


@pytest.mark.parametrize(
    "uri",
    ["http://no-such-host.invalid:5000", "htp://127.0.0.1:5000"],
    ids=["unknown-host", "bad-scheme"],
)
@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_a_wrong_server_uri_is_one_line_within_30_seconds(processed_dir, tmp_path, uri):
    # A typo is not an outage: no offline run (a refused or timed-out connection trains
    # on and waits for `fitscope runs sync`: tests/test_sync.py).
    started = time.monotonic()
    proc = run_train(debug_args(processed_dir), tmp_path, uri)
    line = last_error_line(proc, 2)
    assert line.startswith(f"fitscope: error: cannot use the MLflow tracking store {uri} (")
    assert "Fix: start the tracking server or correct MLFLOW_TRACKING_URI" in line
    assert not (tmp_path / "mlruns-pending").exists()
    assert time.monotonic() - started < 60  # the process start included


def test_an_unreachable_server_is_told_apart_within_30_seconds(monkeypatch):
    with socket.socket() as sock:  # a free loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The retry cap, timed without a process start (MLflow's default: ~4 minutes).
    for key in HTTP_LIMITS:
        monkeypatch.delenv(key, raising=False)
    started = time.monotonic()
    with pytest.raises(ServerUnreachable, match="cannot use the MLflow tracking store"):
        get_client(f"http://127.0.0.1:{port}")
    assert time.monotonic() - started < 30


@pytest.mark.slow  # a real subprocess or server: make test, not test-fast
def test_unwritable_run_dir_is_refused_before_training(processed_dir, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_dir = tmp_path / "a_file" / "run"
    proc = run_train(debug_args(processed_dir, f"paths.run_dir={run_dir}"), tmp_path, uri)
    assert last_error_line(proc, 2).startswith(
        f"fitscope: error: cannot write to paths.run_dir={run_dir} (Not a directory). Fix:"
    )
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB filesystem (tmpfs) mounted for this test; needs root, as CI runs."""
    mount = tmp_path / "tiny_disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a tmpfs and needs root (CI runs as root)")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.slow
def test_disk_full_is_one_line_naming_the_file_and_leaves_no_partial_file(
    processed_dir, tmp_path, tiny_disk, mlflow_uri
):
    args = debug_args(processed_dir, f"paths.run_dir={tiny_disk}", "model=large")
    proc = run_train(args, tmp_path, mlflow_uri)
    assert last_error_line(proc, 2) == (
        f"fitscope: error: no space left on the device while writing {tiny_disk / 'model.pt'}. "
        "Fix: free space there (or write elsewhere, e.g. paths.run_dir=...) and run the same "
        "command again"
    )
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["history.csv"]  # no model.pt, no .tmp
    _, runs = runs_of(get_client(mlflow_uri), "t_store")
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "no space left" in runs[0].data.tags["fitscope.failure"]
