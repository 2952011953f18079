"""Shared fixtures: a local HTTP file server on 127.0.0.1 and tiny real datasets."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fitscope.data import official
from fitscope.data.download import RetryPolicy
from fitscope.data.higgs import fetch_higgs, split_higgs
from fitscope.data.mnist import embedded_mnist, fetch_mnist, split_mnist, write_idx
from fitscope.data.official import HIGGS_EMBEDDED, MNIST_FILES
from fitscope.data.params import HiggsParams, MnistParams
from fitscope.stack.control import start_stack, stop_stack
from fitscope.stack.processes import free_ports
from fitscope.tracking.store import MLFLOW_URI_VARS
from fitscope.tracking.tags import PARENT_TAG

REPO = Path(__file__).resolve().parents[1]
SHARED_HIGGS = REPO.parent / "shared" / "data" / "higgs" / "HIGGS.sample.csv.gz"

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
# Two pytest workers share the cores: each training process takes one thread
# (trainer.num_threads=auto reads it), as joblib and Ray give their workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@dataclass
class Route:
    """What the server does for one path."""

    body: bytes
    status: int = 200
    fail_times: int = 0  # answer `fail_status` this many times first
    fail_status: int = 503
    drop_after: int | None = None  # close the connection after this many body bytes, once
    honour_range: bool = True
    stall_after: int | None = None  # send this many body bytes, then nothing until teardown


@dataclass
class FileServer:
    """A tiny HTTP server for tests; records every request's path and Range header."""

    base_url: str
    routes: dict[str, Route]
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    bytes_sent: dict[str, int] = field(default_factory=dict)  # body bytes per path
    stopping: threading.Event = field(default_factory=threading.Event)  # set at teardown

    def add(self, path: str, body: bytes, **kwargs) -> str:
        self.routes[path] = Route(body, **kwargs)
        return self.base_url + path


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_GET(self) -> None:
            rng = self.headers.get("Range")
            server.requests.append((self.path, rng))
            route = server.routes.get(self.path)
            if route is None:
                self._send(404, b"not found")
                return
            if route.fail_times > 0:
                route.fail_times -= 1
                self._send(route.fail_status, b"try later")
                return
            body, status, extra = route.body, route.status, {}
            if rng and route.honour_range and rng.startswith("bytes="):
                start = int(rng[6:].split("-")[0])
                if start >= len(body):
                    self._send(416, b"", {"Content-Range": f"bytes */{len(body)}"})
                    return
                extra = {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
                body, status = body[start:], 206
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            if route.stall_after is not None:  # a server that hangs mid-body
                self.wfile.write(body[: route.stall_after])
                self.wfile.flush()
                server.stopping.wait(60)
                self.close_connection = True
                return
            if route.drop_after is not None and len(body) > route.drop_after:
                self.wfile.write(body[: route.drop_after])
                self.wfile.flush()
                route.drop_after = None  # drop only once
                self.close_connection = True
                self.connection.shutdown(2)
                return
            try:  # in blocks, counting what the client actually took
                for start in range(0, len(body), 1 << 16):
                    chunk = body[start : start + (1 << 16)]
                    self.wfile.write(chunk)
                    server.bytes_sent[self.path] = server.bytes_sent.get(self.path, 0) + len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

    return Handler


class _QuietHTTPServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        # Clients hang up early on purpose (a streamed head stops reading): not an error.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    """Serve in-memory files on 127.0.0.1 (never any other address)."""
    server = FileServer(base_url="", routes={})
    httpd = _QuietHTTPServer(("127.0.0.1", 0), _handler(server))
    server.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="session")
def higgs_sample_bytes() -> bytes:
    """The real 10,984-row HIGGS sample (shared fixture, else the embedded copy)."""
    path = (
        SHARED_HIGGS
        if SHARED_HIGGS.exists()
        else (REPO / "src" / "fitscope" / "resources" / HIGGS_EMBEDDED)
    )
    return path.read_bytes()


@pytest.fixture(scope="session")
def mnist_idx_dir(tmp_path_factory) -> Path:
    """Small official-layout IDX files (train 600 + t10k 200) built from real embedded digits."""
    images, labels = embedded_mnist()
    perm = np.random.default_rng(0).permutation(len(labels))  # the file is sorted by label
    train, test = perm[:600], perm[600:800]
    out = tmp_path_factory.mktemp("mnist_idx")
    write_idx(out / "train-images-idx3-ubyte.gz", images[train])
    write_idx(out / "train-labels-idx1-ubyte.gz", labels[train])
    write_idx(out / "t10k-images-idx3-ubyte.gz", images[test])
    write_idx(out / "t10k-labels-idx1-ubyte.gz", labels[test])
    return out


@pytest.fixture
def fast_retry():
    """A retry policy that does not sleep long."""

    return RetryPolicy(attempts=3, backoff_s=0.01, timeout_s=5)


def _keep_mlflow_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    """Have ``monkeypatch`` restore the MLFLOW_*_URI variables and MLflow's own URIs.

    ``mlflow.set_tracking_uri``/``set_registry_uri`` (tests) also export them for
    subprocesses: without this, a later test's DVC or training subprocess in the same
    worker would log to this test's store.
    """
    for key in MLFLOW_URI_VARS:
        if key in os.environ:
            monkeypatch.setenv(key, os.environ[key])
        else:
            monkeypatch.delenv(key, raising=False)
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None:
        monkeypatch.setattr(utils, "_tracking_uri", utils._tracking_uri)
    registry = sys.modules.get("mlflow.tracking._model_registry.utils")
    if registry is not None:
        monkeypatch.setattr(registry, "_registry_uri", registry._registry_uri)


@pytest.fixture(autouse=True, scope="module")
def _no_mlflow_uri_leaks_from_module_fixtures() -> Iterator[None]:
    """What a module's fixtures (in-process training) set is undone after the module."""
    with pytest.MonkeyPatch.context() as patch:
        _keep_mlflow_uris(patch)
        yield


@pytest.fixture(autouse=True)
def _no_mlflow_uri_leaks(monkeypatch) -> None:
    """What a test sets is undone after it."""
    _keep_mlflow_uris(monkeypatch)


def venv_env(**extra: str) -> dict[str, str]:
    """This environment with the venv's bin first on PATH and no MLflow store named (a
    command then uses the repository's own store), plus ``extra``."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for key in MLFLOW_URI_VARS:
        env.pop(key, None)
    return {**env, **extra}


def run(cmd: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    """Run a command with :func:`venv_env` (plus ``env=``); fail loudly with its output."""
    env = venv_env(**kwargs.pop("env", {}))
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m fitscope.train -m ARGS` in ``cwd`` with this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "fitscope.train", "-m", *args],
        cwd=cwd,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def job_metrics(sweep_root: Path) -> dict[int, dict]:
    """metrics.json of each job of the one sweep under ``sweep_root``, by seed."""
    files = list(sweep_root.glob("*/*/metrics.json"))
    return {(m := json.loads(f.read_text()))["seed"]: m for f in files}


def nested_finished_children(client, study: str, jobs: int) -> list:
    """The study's child runs, after checking: one FINISHED parent, ``jobs`` FINISHED children
    tagged with it."""

    parents, children = runs_of(client, study)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == jobs
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags[PARENT_TAG] == parents[0].info.run_id
    return children


def make_repo_copy(dest: Path) -> Path:
    """A fresh git repository at ``dest`` with the working tree's files, like a fresh clone.

    Copies what git tracks plus untracked files it does not ignore, so uncommitted work
    is tested too, and nothing generated (data, runs, MLflow store) comes along.
    """
    dest.mkdir(parents=True)
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        src = REPO / name
        if src.is_file() and "__pycache__" not in name:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "ci@fitscope.test"],
        ["git", "config", "user.name", "fitscope-ci"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "fresh clone"],
    ):
        run(cmd, dest)
    return dest


@pytest.fixture
def repo_copy(tmp_path) -> Path:
    return make_repo_copy(tmp_path / "repo")


@pytest.fixture(scope="session")
def processed_dir(tmp_path_factory) -> Path:
    """HIGGS and MNIST splits from the embedded data, as the DVC split stages write them."""
    root = tmp_path_factory.mktemp("processed")
    hp, mp = HiggsParams(), MnistParams()
    fetch_higgs(hp, root / "raw_higgs")
    split_higgs(hp, root / "raw_higgs", root / "higgs")
    fetch_mnist(mp, root / "raw_mnist")
    split_mnist(mp, root / "raw_mnist", root / "mnist")
    return root


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private SQLite MLflow store for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("FITSCOPE_PARENT_RUN_ID", raising=False)
    return uri


def compose(*overrides: str):
    """Compose the real conf/ tree (no Hydra app), as `python -m fitscope.train` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import fitscope.pipeline.schema  # noqa: F401  (registers the schema that conf/train.yaml names)

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def run_train(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    """`python -m fitscope.train ARGS` in ``cwd`` against the MLflow store ``uri``."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("FITSCOPE_PARENT_RUN_ID", None)
    return subprocess.run(
        [sys.executable, "-m", "fitscope.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def serve_mnist(file_server, idx_dir: Path, prefix: str, monkeypatch) -> dict[str, str]:
    """Serve the IDX fixture under ``prefix`` as the official mirror; return the md5s."""
    import hashlib

    md5s = {}
    for name in MNIST_FILES:
        body = (idx_dir / name).read_bytes()
        file_server.add(f"{prefix}{name}", body)
        md5s[name] = hashlib.md5(body).hexdigest()
    monkeypatch.setattr(official, "MNIST_FILES", md5s)
    return md5s


def runs_of(client, study: str) -> tuple[list, list]:
    """(parent runs, child runs) of MLflow experiment ``study``."""
    exp = client.get_experiment_by_name(study)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("fitscope.role") == "parent"]
    return parents, [r for r in runs if r not in parents]


def last_error_line(proc: subprocess.CompletedProcess, returncode: int) -> str:
    """Assert the exit code and that no traceback was printed; return stderr's last line."""
    assert proc.returncode == returncode, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip().splitlines()[-1]


def higgs_gzip(sample: bytes, rows: int) -> bytes:
    """The first ``rows`` rows of the real HIGGS sample, as a gzip file of their own."""
    lines = gzip.decompress(sample).split(b"\n")[:rows]
    return gzip.compress(b"\n".join(lines) + b"\n", mtime=0)


def flip_silently(body: bytes, n_lines: int) -> bytes:
    """``body`` (gzip) with one bit flipped so that it still decompresses, but one of the
    first ``n_lines`` lines reads differently: only the gzip CRC at the very end would
    notice, and a streamed head never reads that far. This is what a flip in transit
    often does (a Huffman code turns into another code of the same length)."""
    want = gzip.decompress(body).split(b"\n")[:n_lines]
    for pos in range(len(body) // 4, len(body) - 8):
        bad = bytearray(body)
        bad[pos] ^= 0x01
        try:
            got = zlib.decompressobj(wbits=-15).decompress(bytes(bad[10:])).split(b"\n")
        except zlib.error:
            continue
        if got[:n_lines] != want:
            return bytes(bad)
    raise AssertionError("no silent bit flip found")


@pytest.fixture(scope="session")
def team_stack(tmp_path_factory):
    """The real team stack (fitscope.stack) on free loopback ports, stopped by PID at the end."""

    state = tmp_path_factory.mktemp("stack")
    info = start_stack(state, free_ports())
    try:
        yield info
    finally:
        stop_stack(state)


# The files that use the `team_stack` session fixture: one worker runs them all, so the
# stack (~30 s to start, ~1.8 GB) is started once per `make test`, not once per worker.
# make bench --smoke starts a stack of its own (the load figures): never at the same time
# as test_stack's (two PostgreSQL servers setting up pgserver's system user at once fail).
TEAM_STACK_FILES = ("test_stack.py", "test_cluster.py", "test_bench.py")


def pytest_itemcollected(item) -> None:
    """`make test` (`--dist loadgroup`) gives each worker one group at a time: a file, or
    the team-stack files together."""
    name = item.path.name
    item.add_marker(pytest.mark.xdist_group("team_stack" if name in TEAM_STACK_FILES else name))


def pytest_collection_modifyitems(config, items) -> None:
    """The slow end-to-end tests first: `make test`'s two workers start on the long groups
    together and the quick ones fill the gaps."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
