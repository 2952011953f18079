"""``make bench``: side-by-side speed ratios measured in one run, written to reports/bench.json.

1. A Lightning epoch of the tiny HIGGS model vs a plain PyTorch loop doing the
   same work (same batches, optimizer, schedule, per-epoch validation and metrics),
   and Lightning's floor: the same Trainer running steps that do no work.
2. In-memory tensor batches vs a default DataLoader over a TensorDataset.
3. ``nn.Dropout`` vs the mask-based ``FastDropout`` in the large model.
4. The large 512x4 model: Lightning vs plain loop, its GFLOP/s against the matmul peak of
   its own shapes, bf16-mixed vs fp32, and what MLflow tracking and resume checkpoints
   cost relative to its training time; ``--study`` times the real study in a scratch copy.
5. Start-up vs work of each pipeline command (``startup``), into reports/bench.json.
6. Full-size HIGGS ingest (the split stage on a synthetic file of the real layout): CPU
   seconds per 11M rows and peak RSS (``--ingest``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext, suppress
from pathlib import Path
from typing import Any

import polars
import torch
import yaml
from isal import igzip
from torch import nn

from fitscope import data
from fitscope.datamodules import ArrayDataModule, TensorBatches
from fitscope.fileio import write_json
from fitscope.models import FastDropout, build_mlp
from fitscope.scoring import classification_metrics, data_loss
from fitscope.synthetic import write_synthetic_higgs
from fitscope.training import EpochHistory, FitModule, RestoreBestWeights, build_trainer

BENCH_JSON = Path("reports/bench.json")
OPT = {"name": "adam", "lr": 1e-3, "eps": 1e-7}
SCHED = {"name": "inverse_time", "decay_epochs": 1000}


def _higgs(tmp: Path) -> ArrayDataModule:
    params = data.HiggsParams()
    data.fetch_higgs(params, tmp / "raw")
    data.split_higgs(params, tmp / "raw", tmp / "higgs")
    dm = ArrayDataModule(tmp / "higgs", task="binary", batch_size=500)
    dm.setup()
    return dm


def plain_loop(
    dm: ArrayDataModule, epochs: int, seed: int = 0, width: int = 16, depth: int = 1
) -> float:
    """Seconds for ``epochs`` epochs of a hand-written loop doing FitModule's work."""
    torch.manual_seed(seed)
    model = build_mlp(28, 1, width=width, depth=depth)
    optimizer = torch.optim.Adam(model.parameters(), lr=OPT["lr"], eps=OPT["eps"])
    steps = len(dm.train_dataloader())
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 / (1.0 + step / (SCHED["decay_epochs"] * steps))
    )
    train_batches, val_batches = dm.train_dataloader(), dm.val_dataloader()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        outs = []
        for x, y in train_batches:
            logits = model(x)
            loss = data_loss("binary", logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            outs.append((logits.detach(), y))
        model.eval()
        with torch.no_grad():
            vals = [(model(x), y) for x, y in val_batches]
        for batch in (outs, vals):
            classification_metrics(
                "binary", torch.cat([o[0] for o in batch]), torch.cat([o[1] for o in batch]), 2
            )
    return time.perf_counter() - start


class EmptySteps(FitModule):
    """FitModule with training and validation steps that do nothing: what is left of an
    epoch is Lightning's own loop, hook and callback machinery (plus batch iteration)."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        return None

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        return None

    def on_validation_epoch_end(self) -> None:
        self.log(self.monitor, 0.0, on_epoch=True, logger=False)


def iterate_only(dm: ArrayDataModule, epochs: int) -> float:
    """Seconds to iterate the training and validation batches ``epochs`` times."""
    train_batches, val_batches = dm.train_dataloader(), dm.val_dataloader()
    start = time.perf_counter()
    for _ in range(epochs):
        for batches in (train_batches, val_batches):
            for _batch in batches:
                pass
    return time.perf_counter() - start


def bench_module(
    width: int, depth: int, steps_per_epoch: int, module_cls: type[FitModule] = FitModule
) -> FitModule:
    """The FitModule training uses, on a binary HIGGS-shaped MLP (Adam, inverse-time decay)."""
    return module_cls(
        build_mlp(28, 1, width=width, depth=depth),
        task="binary",
        num_classes=2,
        optimizer=OPT,
        scheduler=SCHED,
        steps_per_epoch=steps_per_epoch,
    )


def lightning_loop(
    dm: ArrayDataModule,
    epochs: int,
    seed: int = 0,
    module_cls: type[FitModule] = FitModule,
    width: int = 16,
    depth: int = 1,
) -> float:
    """Seconds for ``epochs`` epochs of ``module_cls`` under the Trainer train.py builds."""
    from pytorch_lightning.callbacks import EarlyStopping

    torch.manual_seed(seed)
    module = bench_module(width, depth, len(dm.train_dataloader()), module_cls)
    callbacks = [
        EpochHistory(),
        RestoreBestWeights(),
        EarlyStopping(monitor="val/loss", patience=10**6, check_finite=False),
    ]
    trainer = build_trainer(callbacks, max_epochs=epochs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return time.perf_counter() - start


def default_dataloader_epoch(dm: ArrayDataModule, repeats: int) -> tuple[float, float]:
    """Seconds to iterate the training split: tensor slices vs a default DataLoader."""
    x, y = dm.tensors["train"]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=500, shuffle=True
    )
    fast = TensorBatches(x, y, 500, shuffle=True)
    timings = []
    for batches in (fast, loader):
        start = time.perf_counter()
        for _ in range(repeats):
            for _batch in batches:
                pass
        timings.append(time.perf_counter() - start)
    return timings[0], timings[1]


def dropout_step(dropout: nn.Module, repeats: int) -> float:
    """Seconds for forward+backward of the 512x4 model with the given dropout module."""
    torch.manual_seed(0)
    model = build_mlp(28, 1, width=512, depth=4, dropout=0.5)
    layers = [dropout if isinstance(m, FastDropout) else m for m in model]
    model = nn.Sequential(*layers).train()
    x, y = torch.randn(500, 28), torch.randint(0, 2, (500,)).float()
    start = time.perf_counter()
    for _ in range(repeats):
        data_loss("binary", model(x), y).backward()
    return time.perf_counter() - start


def checkpoint_save_seconds(dm: ArrayDataModule, tmp: Path, saves: int = 5) -> float:
    """Median seconds of one resume checkpoint of the large 512x4 model (train.py's Trainer)."""
    from fitscope.training import PeriodicCheckpoint

    module = bench_module(512, 4, len(dm.train_dataloader()))
    callbacks = [EpochHistory(), RestoreBestWeights(), PeriodicCheckpoint(tmp / "c.ckpt")]
    trainer = build_trainer(callbacks, max_epochs=2)
    trainer.fit(module, datamodule=dm)
    timings = []
    for _ in range(saves):
        start = time.perf_counter()
        trainer.save_checkpoint(tmp / "last.ckpt", weights_only=False)
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def gpu_throughput(rows: int, batch_size: int, precision: str, epochs: int = 2) -> dict:
    """Training rows/s of the large 512x4 model on synthetic HIGGS-shaped data on the GPU.

    The real FitModule and Trainer (train.py's), data resident on the GPU; the first
    epoch (CUDA start-up, kernel selection) is excluded from the timing.
    """
    import pytorch_lightning as pl

    class EpochTimes(pl.Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(rows, 28, device="cuda", generator=gen)
    y = (x[:, :3].sum(1) + 0.5 * torch.randn(rows, device="cuda", generator=gen) > 0).float()
    n_val = max(rows // 20, batch_size)

    class GpuData(pl.LightningDataModule):
        def train_dataloader(self):
            return TensorBatches(x[n_val:], y[n_val:], batch_size, shuffle=True)

        def val_dataloader(self):
            return TensorBatches(x[:n_val], y[:n_val], batch_size, shuffle=False)

    torch.manual_seed(0)
    steps = -(-(rows - n_val) // batch_size)
    module = bench_module(512, 4, steps)
    timer = EpochTimes()
    trainer = build_trainer(
        [timer, EpochHistory()],
        max_epochs=epochs,
        accelerator="gpu",
        deterministic=False,
        precision=precision,
    )
    trainer.fit(module, datamodule=GpuData())
    seconds = timer.marks[-1] - timer.marks[-2]  # the last epoch's training part
    return {
        "rows": rows - n_val,
        "batch_size": batch_size,
        "precision": precision,
        "epoch_s": seconds,  # training + validation + epoch metrics
        "rows_per_s": (rows - n_val) / seconds,
    }


def gpu_main(out: Path | None, rows: int) -> None:
    """GPU figures for docs/benchmarks.md (run on a machine with a CUDA GPU)."""
    import json

    name = torch.cuda.get_device_name(0)
    results = {"device": name, "torch": torch.__version__, "runs": []}
    for batch_size in (500, 8192):
        for precision in ("32-true", "bf16-mixed"):
            result = gpu_throughput(rows, batch_size, precision)
            results["runs"].append(result)
            print(
                f"{name}: 512x4 MLP, {result['rows']} rows, batch {batch_size}, {precision}: "
                f"{result['rows_per_s']:,.0f} rows/s ({result['epoch_s']:.2f} s/epoch)",
                flush=True,
            )
    if out is not None:
        out.write_text(json.dumps(results, indent=2) + "\n")


# The DVC stages' commands on tiny real data (embedded HIGGS, debug profile), in order.
STARTUP_COMMANDS = {
    "fetch": ["fetch", "higgs"],
    "split": ["split", "higgs"],
    "train": ["train", "higgs"],
    "evaluate": ["evaluate", "higgs"],
    "report": ["report"],
}
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")  # a top-level import


def _import_seconds(stderr: str) -> float:
    """Total import time of a process from its ``-X importtime`` lines (top level only:
    each one's cumulative time already holds the imports below it)."""
    return sum(int(m[1]) for m in map(_IMPORT_LINE.match, stderr.splitlines()) if m) / 1e6


def startup(out: Path = BENCH_JSON) -> dict[str, dict[str, float]]:
    """Start-up vs work of each stage's command, run as DVC runs it (a new process).

    Start-up = starting the interpreter (``python -c pass``) + every import the command
    made, wherever it made it (``-X importtime``); work = the rest of its wall time. The
    figures go to ``startup_s.<command>`` / ``work_s.<command>`` in ``out`` (merged into
    what is there).
    """
    params = yaml.safe_load((Path.cwd() / "params.yaml").read_text())
    params["study"] = {"profile": "debug", "seeds": "0", "jobs": 1}
    params["variants"] = {"higgs": {"higgs-tiny": params["variants"]["higgs"]["higgs-tiny"]}}
    begin = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    interpreter = time.perf_counter() - begin
    figures: dict[str, dict[str, float]] = {"startup_s": {}, "work_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "params.yaml").write_text(yaml.safe_dump(params))
        shutil.copytree(Path.cwd() / "conf", Path(tmp) / "conf")
        env = {
            **os.environ,
            "FITSCOPE_PROGRESS": "0",
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/m.db",
        }
        for name, args in STARTUP_COMMANDS.items():
            began = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "fitscope.cli", *args],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
            )
            wall = time.perf_counter() - began
            if proc.returncode != 0:
                raise SystemExit(
                    f"bench: `fitscope {' '.join(args)}` failed:\n{proc.stderr[-2000:]}"
                )
            start = interpreter + _import_seconds(proc.stderr)
            figures["startup_s"][name] = round(start, 3)
            figures["work_s"][name] = round(max(wall - start, 0.0), 3)
    print("start-up vs work of each stage's command (s; debug profile, tiny data):")
    for name in STARTUP_COMMANDS:
        print(
            f"  {name:9s} start-up {figures['startup_s'][name]:6.2f}   "
            f"work {figures['work_s'][name]:6.2f}"
        )
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged.update(figures)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=2) + "\n")
    print(f"  written to {out} (startup_s, work_s)")
    return figures


def progress_seconds_per_epoch(epochs: int = 2000) -> float:
    """What ``EpochProgress`` costs an epoch at worst: a line built and written every epoch
    (a terminal redraws at most once a second, a pipe every ``progress_every_s``)."""
    import io
    from types import SimpleNamespace

    from fitscope.progress import LineProgress
    from fitscope.training import EpochProgress

    line = LineProgress("bench", every_s=0.0, stream=io.StringIO(), live=False)
    restore = RestoreBestWeights()
    restore.best_score, restore.best_epoch = 0.61, 3
    callback = EpochProgress(line, max_epochs=10**4, monitor="val/loss", restore=restore)
    trainer = SimpleNamespace(current_epoch=0, sanity_checking=False)
    module = SimpleNamespace(epoch_metrics={"epoch": 0, "val/loss": 0.62})
    callback.on_train_start(trainer, module)
    started = time.perf_counter()
    for epoch in range(epochs):
        module.epoch_metrics["epoch"] = epoch
        callback.on_validation_end(trainer, module)
    return (time.perf_counter() - started) / epochs


def epoch_gflop(dm: ArrayDataModule, width: int, depth: int) -> float:
    """GFLOP of one training epoch plus validation of a ``width`` x ``depth`` MLP: 2 per
    multiply-add of every Linear layer, 3x that for training rows (forward + backward)."""
    features = dm.num_features
    dims = [features, *([width] * depth), 1]
    macs = sum(a * b for a, b in itertools.pairwise(dims))
    rows = len(dm.tensors["train"][1])
    val_rows = len(dm.tensors["val"][1])
    return 2 * macs * (3 * rows + val_rows) / 1e9


def matmul_peak_gflops(width: int = 512, batch: int = 500, repeats: int = 200) -> float:
    """GFLOP/s of the large model's dominant product (batch x width @ width x width), the
    best of 5 runs: what this core reaches on exactly these shapes."""
    a, b = torch.randn(batch, width), torch.randn(width, width)
    for _ in range(20):
        a @ b
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * batch * width * width * repeats / best / 1e9


def precision_step_seconds(precision: str, steps: int = 6, width: int = 512) -> float:
    """Median seconds of one training step (batch 500, forward + backward + Adam) of the
    512x4 model under Lightning's CPU autocast for ``precision``."""
    torch.manual_seed(0)
    model = build_mlp(28, 1, width=width, depth=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(500, 28), torch.randint(0, 2, (500,)).float()
    bf16 = precision == "bf16-mixed"
    timings = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = data_loss("binary", model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings[1:])


def tracking_seconds(tmp: Path, epochs: int, flush_every: int = 25) -> float:
    """Seconds MLflow tracking adds to one run of ``epochs`` epochs, as train.py tracks it:
    create the run with its params and tags, the epoch rows in batches of ``flush_every``,
    the summary, the model (pyfunc) and the end. Against a fresh SQLite store."""
    from fitscope import tracking
    from fitscope.models import ProbabilityModel

    client = tracking.get_client(f"sqlite:///{tmp / 'bench-mlflow.db'}")
    exp = tracking.ensure_experiment(client, "bench")
    row = {"epoch": 0, "val/loss": 0.6, "val/acc": 0.6, "val/auroc": 0.7, "train/loss": 0.6}
    row |= {"train/acc": 0.6, "train/auroc": 0.7, "train/l2_penalty": 0.0, "lr": 1e-3}
    params = {f"group.key{i}": i for i in range(40)}  # ~ the flattened training config
    model = ProbabilityModel(build_mlp(28, 1, width=512, depth=4).eval(), "binary")
    start = time.perf_counter()
    tracker = tracking.RunTracker.create(client, exp, "bench", params, {"fitscope.bench": "1"})
    for first in range(0, epochs, flush_every):
        last = min(first + flush_every, epochs)
        tracker.log_rows([{**row, "epoch": e} for e in range(first, last)])
    tracker.log_summary({"best/val/loss": 0.6, "best_epoch": 1.0})
    tracker.log_model(model, torch.randn(5, 28).numpy())
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
LOAD_ROW |= {"train/acc": 0.6, "train/auroc": 0.7, "train/l2_penalty": 0.0, "lr": 1e-3}


def _load_job(uri: str, experiment_id: str, job: int, epochs: int, start_at: float) -> str:
    """One job of the load benchmark: a run that logs ``epochs`` rows, one request each."""
    from fitscope import tracking

    client = tracking.get_client(uri)
    params = {f"group.key{i}": i for i in range(40)}
    tracker = tracking.RunTracker.create(client, experiment_id, f"load-{job}", params, {})
    time.sleep(max(0.0, start_at - time.time()))  # every job starts logging together
    for epoch in range(epochs):
        tracker.log_rows([{**LOAD_ROW, "epoch": epoch}])
    tracker.finish()
    return tracker.run_id


def load_figures(jobs: int, epochs: int, uri: str | None = None) -> dict[str, Any]:
    """Metric points per second that ``jobs`` processes send through one tracking server,
    each logging every epoch as its own request (``logger.flush_every=1``), checked for
    lost points afterwards. Without ``uri``: against the team stack (fitscope.stack:
    PostgreSQL, S3, MLflow with basic auth; no Ray) started here on free ports, with its
    RSS (every process of it) idle and at peak.
    """
    import threading
    from concurrent.futures import ProcessPoolExecutor

    from fitscope import stack, tracking

    with tempfile.TemporaryDirectory() as tmp:
        info = None
        if uri is None:
            parts = ("postgres", "s3", "mlflow")
            info = stack.start_stack(Path(tmp) / "stack", stack.free_ports(), parts)
            os.environ.update(info.client_env())  # the workers inherit the credentials
            uri = info.tracking_uri
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.wait(0.2):
                peak[0] = max(peak[0], stack_rss_bytes(info.pids))

        try:
            client = tracking.get_client(uri)
            exp = tracking.ensure_experiment(client, f"bench-load-{int(time.time())}")
            idle = stack_rss_bytes(info.pids) if info else 0
            if info is not None:
                threading.Thread(target=sample, daemon=True).start()
            with ProcessPoolExecutor(jobs) as pool:
                start_at = time.time() + 15  # after every worker has imported MLflow
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
            if info is not None:
                stack.stop_stack(info.state_dir)
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


def study_minutes(profile: str) -> float:
    """Wall minutes of ``dvc repro`` (the study, ``study.profile=profile``) in a scratch copy
    of this checkout (what git tracks plus untracked, unignored files), with its own
    MLflow store: nothing here is touched."""
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    listed = subprocess.check_output(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, text=True
    )
    with tempfile.TemporaryDirectory(prefix="fitscope-study-") as tmp:
        copy = Path(tmp) / "repo"
        for name in filter(None, listed.split("\0")):
            if (root / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, copy / name)
        params = copy / "params.yaml"
        params.write_text(params.read_text().replace("profile: classic", f"profile: {profile}", 1))
        git = ["git", "-c", "user.email=bench@fitscope.invalid", "-c", "user.name=bench"]
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "s"]):
            subprocess.run(cmd, cwd=copy, check=True, capture_output=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}"}
        # The stages import the copy's code, whichever checkout the venv was installed from.
        paths = [str(copy / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        env.pop("FITSCOPE_PARENT_RUN_ID", None)
        # The stages call `fitscope`: the venv's scripts first on PATH, as `make` puts them.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        dvc = Path(sys.executable).with_name("dvc")
        start = time.perf_counter()
        subprocess.run([str(dvc), "repro"], cwd=copy, env=env, check=True)
        return (time.perf_counter() - start) / 60


def record(figures: dict[str, Any], path: Path = BENCH_JSON) -> dict[str, Any]:
    """Merge ``figures`` into the JSON file at ``path`` (other benchmarks add their own keys)
    and return the whole content. Written atomically."""
    from fitscope.fileio import write_json

    content = json.loads(path.read_text()) if path.is_file() else {}
    content.update(figures)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, content)
    return content


GOALS = {
    "large_lightning_over_plain": "<= 1.05",
    "large_efficiency": ">= 0.8",
    "tracking_overhead": "<= 0.02",
    "checkpoint_overhead": "<= 0.01",
    "study_minutes": "<= 9",
}


def print_table(figures: dict[str, Any]) -> None:
    width = max(map(len, figures))
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        goal = f"  (goal {GOALS[key]})" if key in GOALS else ""
        print(f"  {key:<{width}}  {shown}{goal}")


def bench_large(dm: ArrayDataModule, epochs: int, rounds: int, tmp: Path) -> dict[str, Any]:
    """The figures of the large 512x4 model (see the module docstring)."""
    from fitscope.precision import cpu_has_native_bf16

    lightning_loop(dm, 1, width=512, depth=4)  # warm-up
    plain, light = [], []
    for _ in range(rounds):  # interleaved, so drift hits both sides alike
        plain.append(plain_loop(dm, epochs, width=512, depth=4))
        light.append(lightning_loop(dm, epochs, width=512, depth=4))
    epoch_s = min(light) / epochs
    gflops = epoch_gflop(dm, 512, 4) / epoch_s
    peak = matmul_peak_gflops()
    fp32 = precision_step_seconds("32-true")
    bf16 = precision_step_seconds("bf16-mixed")
    # The large variant of the classic study: 221 epochs (docs/results/classic).
    tracked = tracking_seconds(tmp, 221)
    save = checkpoint_save_seconds(dm, tmp)
    return {
        "large_lightning_over_plain": statistics.median(
            b / a for a, b in zip(plain, light, strict=True)
        ),
        "large_epoch_s": epoch_s,
        "large_gflops": gflops,
        "matmul_peak_gflops": peak,
        "large_efficiency": gflops / peak,
        "cpu_native_bf16": cpu_has_native_bf16(),
        "bf16_over_fp32_speed": fp32 / bf16,
        "tracking_overhead": tracked / (221 * epoch_s),
        "checkpoint_overhead": save / CHECKPOINT_EVERY_S,
    }


HIGGS_FULL_ROWS = 11_000_000
BASE_ROWS = 20_000  # the ingest baseline: fixed costs measured on a file this small


def _child_usage(args: list[str]) -> tuple[float, float]:
    """(CPU seconds, peak RSS in GB) of ``python -m fitscope.cli ARGS`` in a child process."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fitscope.cli", *args], stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"`fitscope {' '.join(args)}` exited {proc.returncode}")
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 2**20  # Linux: KiB


def _split_usage(raw: Path, rows: int, tmp: Path) -> tuple[float, float]:
    """(CPU s, peak RSS GB) of `fitscope split higgs` (size=full) of ``raw``/HIGGS.csv.gz."""
    higgs = {"source": "mirror", "size": "full", "mirror": "unused", "val_rows": 1000}
    higgs["test_rows"] = max(1, rows * 500_000 // HIGGS_FULL_ROWS)  # as 500,000 of 11M
    params = tmp / f"params-{raw.name}.yaml"
    params.write_text(json.dumps({"data": {"higgs": higgs}}))  # JSON is YAML
    out = tmp / f"out-{raw.name}"
    return _child_usage(
        ["--params", str(params), "split", "higgs", "--raw", str(raw), "--out", str(out)]
    )


def ingest_figures(rows: int, file: Path | None = None) -> dict[str, float | int | str]:
    """`fitscope split higgs` (size=full) of a synthetic file of ``rows`` rows (or ``file``).

    ``ingest_s_per_11M_rows``: CPU seconds (user + system, all threads) of the child
    process, minus those of the same command on a 20,000-row file (start-up, imports and
    other fixed costs), per row, times 11M (the work per row is constant).
    ``ingest_peak_rss_gb``: the child's peak resident memory, nothing subtracted; it does
    not grow with the file except the test-row queue (the last ``rows / 22`` rows here, as
    500,000 of 11M: 58 MB for the real file).
    """
    with tempfile.TemporaryDirectory(prefix="fitscope-ingest-") as tmp_dir:
        tmp = Path(tmp_dir)
        base, raw = tmp / "base", tmp / "raw"
        write_synthetic_higgs(base / data.HIGGS_FILE, BASE_ROWS, seed=1)
        raw.mkdir()
        if file is None:
            write_synthetic_higgs(raw / data.HIGGS_FILE, rows)
        else:
            (raw / data.HIGGS_FILE).symlink_to(file.resolve())
            with igzip.open(file, "rb") as fh:  # rows = lines (a valid file ends each)
                rows = sum(block.count(b"\n") for block in iter(lambda: fh.read(1 << 24), b""))
        if rows <= BASE_ROWS:
            raise ValueError(f"--ingest-rows must exceed {BASE_ROWS} (the fixed-cost baseline)")
        base_cpu, _ = _split_usage(base, BASE_ROWS, tmp)
        cpu, rss = _split_usage(raw, rows, tmp)
    return {
        "ingest_s_per_11M_rows": round((cpu - base_cpu) * HIGGS_FULL_ROWS / (rows - BASE_ROWS), 2),
        "ingest_peak_rss_gb": round(rss, 3),
        "ingest_rows_measured": rows,
        "ingest_engine": f"polars {polars.__version__} over isal, "
        f"{data.HIGGS_BLOCK_BYTES >> 20} MB blocks",
    }


def report_ingest(rows: int, file: Path | None = None, out: Path = BENCH_JSON) -> None:
    """Print the ingest figures and merge them into ``reports/bench.json`` (other keys kept)."""
    figures = ingest_figures(rows, file)
    merged = json.loads(out.read_text()) if out.is_file() else {}
    merged.update(figures)
    write_json(out, merged)
    print(
        f"  full HIGGS ingest ({figures['ingest_rows_measured']:,} synthetic rows, "
        f"{figures['ingest_engine']}): {figures['ingest_s_per_11M_rows']:.1f} CPU s per 11M "
        f"rows (goal <= 35), peak RSS {figures['ingest_peak_rss_gb']:.2f} GB (goal <= 2) "
        f"-> {out}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--large-epochs", type=int, default=3)
    parser.add_argument("--large-rounds", type=int, default=3)
    parser.add_argument("--gpu", action="store_true", help="GPU throughput figures only")
    parser.add_argument("--gpu-rows", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, help="write the --gpu figures as JSON here")
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint cost only")
    parser.add_argument(
        "--study",
        nargs="?",
        const="classic",
        metavar="PROFILE",
        help="also time `dvc repro` of the study (default profile classic) in a scratch copy",
    )
    parser.add_argument("--json", type=Path, default=BENCH_JSON, help="figures merged here")
    parser.add_argument("--startup", action="store_true", help="command start-up cost only")
    parser.add_argument("--ingest", action="store_true", help="full-HIGGS ingest figures only")
    parser.add_argument(
        "--ingest-rows", type=int, default=1_000_000, help="synthetic rows (figures per 11M)"
    )
    parser.add_argument("--ingest-file", type=Path, help="ingest this HIGGS.csv.gz instead")
    parser.add_argument(
        "--load",
        type=int,
        nargs="?",
        const=8,
        metavar="JOBS",
        help="tracking-server load only: JOBS (8) concurrent runs logging every epoch",
    )
    parser.add_argument("--load-epochs", type=int, default=25)
    parser.add_argument(
        "--load-uri", help="an existing tracking server (default: start a plain one here)"
    )
    args = parser.parse_args(argv)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    if args.load:
        figures = load_figures(args.load, args.load_epochs, args.load_uri)
        print(f"figures merged into {args.json}:")
        print_table(figures)
        record(figures, args.json)
        return
    if args.ingest:
        report_ingest(args.ingest_rows, args.ingest_file, args.json)
        return
    if args.startup:
        startup(args.json)
        return
    if args.gpu:
        gpu_main(args.out, args.gpu_rows)
        return
    torch.set_num_threads(1)
    if args.checkpoint:
        with tempfile.TemporaryDirectory() as tmp:
            report_checkpoint_cost(_higgs(Path(tmp)), Path(tmp))
        return
    with tempfile.TemporaryDirectory() as tmp:
        dm = _higgs(Path(tmp))
        figures = bench_tiny(dm, args.epochs, args.rounds)
        figures |= bench_large(dm, args.large_epochs, args.large_rounds, Path(tmp))
    if args.study:
        figures["study_profile"] = args.study
        figures["study_minutes"] = study_minutes(args.study)
    figures["threads"] = 1
    print(f"figures merged into {args.json}:")
    print_table(figures)
    record(figures, args.json)
    startup(args.json)
    report_ingest(args.ingest_rows, args.ingest_file, args.json)


def bench_tiny(dm: ArrayDataModule, epochs: int, rounds: int) -> dict[str, Any]:
    """The tiny model vs a plain loop and Lightning's floor (printed as before)."""
    plain_loop(dm, 3)  # warm-up every path
    lightning_loop(dm, 3)
    lightning_loop(dm, 3, module_cls=EmptySteps)
    plain, light, floor, iterate = [], [], [], []
    for _ in range(rounds):  # interleaved, so drift hits every side alike
        plain.append(plain_loop(dm, epochs))
        light.append(lightning_loop(dm, epochs))
        floor.append(lightning_loop(dm, epochs, module_cls=EmptySteps))
        iterate.append(iterate_only(dm, epochs))
    fast, default = default_dataloader_epoch(dm, 50)
    p, li = statistics.median(plain), statistics.median(light)
    fl, it = statistics.median(floor), statistics.median(iterate)
    ratios = sorted(b / a for a, b in zip(plain, light, strict=True))
    # Best any per-batch LightningModule could reach: the plain loop plus Lightning's
    # floor, minus the batch iteration that both already contain.
    best = sorted((a + f - i) / a for a, f, i in zip(plain, floor, iterate, strict=True))
    print(f"tiny HIGGS model, {epochs} epochs x {rounds} interleaved rounds, 1 thread:")
    print(f"  plain torch loop   {1000 * p / epochs:7.2f} ms/epoch (median)")
    print(f"  Lightning loop     {1000 * li / epochs:7.2f} ms/epoch (median)")
    print(
        f"  ratio Lightning / plain: median of rounds {statistics.median(ratios):.2f}x, "
        f"best-of-each {min(light) / min(plain):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x"
    )
    print(f"  Lightning floor  {1000 * fl / epochs:7.2f} ms/epoch (same Trainer, no-op steps)")
    print(f"  batch iteration  {1000 * it / epochs:7.2f} ms/epoch (no work at all)")
    print(
        f"  lowest reachable ratio, (plain + floor - iteration) / plain: "
        f"median {statistics.median(best):.2f}x, range {best[0]:.2f}-{best[-1]:.2f}x"
    )
    print(f"  default DataLoader / tensor batches (iteration only) = {default / fast:.1f}x")
    cost = progress_seconds_per_epoch()
    print(
        f"  progress line, written every epoch (worst case): {1e6 * cost:.0f} us an epoch = "
        f"{100 * cost * epochs / li:.2f}% of a tiny-model Lightning epoch (goal <= 1%)"
    )
    nn_drop = statistics.median(dropout_step(nn.Dropout(0.5), 20) for _ in range(3))
    fast_drop = statistics.median(dropout_step(FastDropout(0.5), 20) for _ in range(3))
    print(f"  512x4 fwd+bwd: nn.Dropout / FastDropout = {nn_drop / fast_drop:.2f}x")
    return {
        "tiny_lightning_over_plain": statistics.median(ratios),
        "tiny_floor_over_plain": statistics.median(best),
        "tiny_lightning_over_floor": statistics.median(ratios) / statistics.median(best),
    }


CHECKPOINT_EVERY_S = 30.0  # conf/callbacks/default.yaml: callbacks.checkpoint.every_s


def report_checkpoint_cost(dm: ArrayDataModule, tmp: Path) -> None:
    """Resume checkpoints cost one save per ``callbacks.checkpoint.every_s`` of training."""

    every_s = CHECKPOINT_EVERY_S
    save = checkpoint_save_seconds(dm, tmp)
    print(
        f"  resume checkpoint of the 512x4 model: {1000 * save:.0f} ms a save; at one save per "
        f"{every_s:.0f} s of training (the default) that is {100 * save / every_s:.2f}% "
        "of training time (goal <= 1%)"
    )


if __name__ == "__main__":
    main()
