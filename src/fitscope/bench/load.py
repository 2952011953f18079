"""What MLflow tracking costs: one run's tracking overhead against a SQLite store, and the
load of many concurrent runs on a tracking server (``--load``).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

from fitscope.model.mlp import ProbabilityModel, build_mlp
from fitscope.stack.control import start_stack, stop_stack
from fitscope.stack.info import StackInfo
from fitscope.stack.processes import free_ports
from fitscope.tracking.experiments import ensure_experiment
from fitscope.tracking.run import RunTracker
from fitscope.tracking.store import get_client


def tracking_seconds(tmp: Path, epochs: int, flush_every: int = 25) -> float:
    """Seconds MLflow tracking adds to one run of ``epochs`` epochs, as train.py tracks it:
    create the run with its params and tags, the epoch rows in batches of ``flush_every``,
    the summary, the model (pyfunc) and the end. Against a fresh SQLite store."""

    client = get_client(f"sqlite:///{tmp / 'bench-mlflow.db'}")
    exp = ensure_experiment(client, "bench")
    row = {"epoch": 0, "val/loss": 0.6, "val/acc": 0.6, "val/auroc": 0.7, "train/loss": 0.6}
    row |= {"train/acc": 0.6, "train/auroc": 0.7, "train/l2_penalty": 0.0, "lr": 1e-3}
    params = {f"group.key{i}": i for i in range(40)}  # ~ the flattened training config
    model = ProbabilityModel(build_mlp(28, 1, width=512, depth=4).eval(), "binary")
    start = time.perf_counter()
    tracker = RunTracker.create(client, exp, "bench", params, {"fitscope.bench": "1"})
    for first in range(0, epochs, flush_every):
        last = min(first + flush_every, epochs)
        tracker.log_rows([{**row, "epoch": e} for e in range(first, last)])
    tracker.log_summary({"best/val/loss": 0.6, "best_epoch": 1.0})
    tracker.log_model(model, torch.randn(5, 28).numpy(), step=epochs - 1)
    tracker.finish()
    return time.perf_counter() - start


def stack_rss_bytes(pids: dict[str, int]) -> int:
    """Resident memory of the stack's processes (``StackInfo.pids``) and all their children."""
    import psutil

    total = 0
    for pid in pids.values():
        with suppress(psutil.NoSuchProcess):
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                with suppress(psutil.NoSuchProcess):
                    total += proc.memory_info().rss
    return total


LOAD_ROW = {"val/loss": 0.6, "val/acc": 0.6, "val/auroc": 0.7, "train/loss": 0.6}


def _load_job(uri: str, experiment_id: str, job: int, epochs: int, start_at: float) -> str:
    """One job of the load benchmark: a run that logs ``epochs`` rows, one request each."""

    client = get_client(uri)
    params = {f"group.key{i}": i for i in range(40)}
    tracker = RunTracker.create(client, experiment_id, f"load-{job}", params, {})
    time.sleep(max(0.0, start_at - time.time()))  # every job starts logging together
    for epoch in range(epochs):
        tracker.log_rows([{**LOAD_ROW, "epoch": epoch}])
    tracker.finish()
    return tracker.run_id


def _load_target(
    uri: str | None, stack: StackInfo | None, tmp: Path
) -> tuple[str, StackInfo | None, bool]:
    """The store to load (``uri``, else the stack's server), the stack whose memory is
    measured, and whether it was started here (in ``tmp``: then it is stopped after)."""
    if uri is not None:
        return uri, None, False
    started = stack is None
    if started:
        stack = start_stack(tmp / "stack", free_ports(), ("postgres", "s3", "mlflow"))
    os.environ.update(stack.client_env())  # the workers inherit the credentials
    return stack.tracking_uri, stack, started


def load_figures(
    jobs: int,
    epochs: int,
    uri: str | None = None,
    stack: StackInfo | None = None,
    warmup_s: float = 15.0,
) -> dict[str, Any]:
    """Metric points per second that ``jobs`` processes send through one tracking server,
    each logging every epoch as its own request (``logger.flush_every=1``), checked for
    lost points afterwards. Without ``uri``: against a team stack (fitscope.stack:
    PostgreSQL, S3, MLflow with basic auth; no Ray), ``stack`` or one started here on free
    ports, with its RSS (every process of it) idle and at peak. The jobs start together,
    ``warmup_s`` after they are launched (once every worker has imported MLflow).
    """

    with tempfile.TemporaryDirectory() as tmp:
        uri, info, started = _load_target(uri, stack, Path(tmp))
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], stack_rss_bytes(info.pids))

        try:
            client = get_client(uri)
            exp = ensure_experiment(client, f"bench-load-{int(time.time())}")
            idle = stack_rss_bytes(info.pids) if info else 0
            if info is not None:
                threading.Thread(target=sample, daemon=True).start()
            with ProcessPoolExecutor(jobs) as pool:
                start_at = time.time() + warmup_s
                futures = [
                    pool.submit(_load_job, uri, exp, j, epochs, start_at) for j in range(jobs)
                ]
                run_ids = [f.result() for f in futures]
            wall = time.time() - start_at
            done.set()
            lost = sum(
                epochs - len(client.get_metric_history(r, key)) for r in run_ids for key in LOAD_ROW
            )
        finally:
            done.set()
            if started:
                stop_stack(info.state_dir)
    points = jobs * epochs * len(LOAD_ROW)
    figures = {
        "load_jobs": jobs,
        "load_points": points,
        "load_requests_per_s": jobs * epochs / wall,
        "load_points_per_s": points / wall,
        "load_points_lost": lost,
        "load_server": "team stack (PostgreSQL, S3, MLflow 1 worker)" if info else uri,
    }
    if info is not None:
        figures["load_stack_rss_idle_mb"] = idle / 2**20
        figures["load_stack_rss_peak_mb"] = peak[0] / 2**20
    return figures
