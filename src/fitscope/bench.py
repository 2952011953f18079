"""``make bench``: side-by-side speed ratios measured in one run (no absolute claims).

1. A Lightning epoch of the tiny HIGGS model vs a plain PyTorch loop doing the
   same work (same batches, optimizer, schedule, per-epoch validation and metrics),
   and Lightning's floor: the same Trainer running steps that do no work.
2. In-memory tensor batches vs a default DataLoader over a TensorDataset.
3. ``nn.Dropout`` vs the mask-based ``FastDropout`` in the large model.
4. Start-up vs work of each pipeline command (``startup``), into reports/bench.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml
from torch import nn

from fitscope import data
from fitscope.datamodules import ArrayDataModule, TensorBatches
from fitscope.models import FastDropout, build_mlp
from fitscope.scoring import classification_metrics, data_loss
from fitscope.training import EpochHistory, FitModule, RestoreBestWeights, build_trainer

OPT = {"name": "adam", "lr": 1e-3, "eps": 1e-7}
SCHED = {"name": "inverse_time", "decay_epochs": 1000}


def _higgs(tmp: Path) -> ArrayDataModule:
    params = data.HiggsParams()
    data.fetch_higgs(params, tmp / "raw")
    data.split_higgs(params, tmp / "raw", tmp / "higgs")
    dm = ArrayDataModule(tmp / "higgs", task="binary", batch_size=500)
    dm.setup()
    return dm


def plain_loop(dm: ArrayDataModule, epochs: int, seed: int = 0) -> float:
    """Seconds for ``epochs`` epochs of a hand-written loop doing FitModule's work."""
    torch.manual_seed(seed)
    model = build_mlp(28, 1, width=16, depth=1)
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
    dm: ArrayDataModule, epochs: int, seed: int = 0, module_cls: type[FitModule] = FitModule
) -> float:
    """Seconds for ``epochs`` epochs of ``module_cls`` under the Trainer train.py builds."""
    from pytorch_lightning.callbacks import EarlyStopping

    torch.manual_seed(seed)
    module = bench_module(16, 1, len(dm.train_dataloader()), module_cls)
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
    "train": ["train", "higgs-tiny"],
    "evaluate": ["evaluate", "higgs-tiny"],
    "report": ["report"],
}
_IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+(\d+) \| (\S.*)$")  # a top-level import


def _import_seconds(stderr: str) -> float:
    """Total import time of a process from its ``-X importtime`` lines (top level only:
    each one's cumulative time already holds the imports below it)."""
    return sum(int(m[1]) for m in map(_IMPORT_LINE.match, stderr.splitlines()) if m) / 1e6


def startup(out: Path = Path("reports/bench.json")) -> dict[str, dict[str, float]]:
    """Start-up vs work of each stage's command, run as DVC runs it (a new process).

    Start-up = starting the interpreter (``python -c pass``) + every import the command
    made, wherever it made it (``-X importtime``); work = the rest of its wall time. The
    figures go to ``startup_s.<command>`` / ``work_s.<command>`` in ``out`` (merged into
    what is there).
    """
    params = yaml.safe_load((Path.cwd() / "params.yaml").read_text())
    params["study"] = {"profile": "debug", "seeds": "0"}
    params["variants"] = {"higgs-tiny": params["variants"]["higgs-tiny"]}
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gpu", action="store_true", help="GPU throughput figures only")
    parser.add_argument("--gpu-rows", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, help="write the --gpu figures as JSON here")
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint cost only")
    parser.add_argument("--startup", action="store_true", help="command start-up cost only")
    args = parser.parse_args(argv)
    if args.startup:
        startup()
        return
    if args.checkpoint:
        torch.set_num_threads(1)
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        with tempfile.TemporaryDirectory() as tmp:
            report_checkpoint_cost(_higgs(Path(tmp)), Path(tmp))
        return
    if args.gpu:
        logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore")
        gpu_main(args.out, args.gpu_rows)
        return
    torch.set_num_threads(1)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        dm = _higgs(Path(tmp))
        plain_loop(dm, 3)  # warm-up every path
        lightning_loop(dm, 3)
        lightning_loop(dm, 3, module_cls=EmptySteps)
        plain, light, floor, iterate = [], [], [], []
        for _ in range(args.rounds):  # interleaved, so drift hits every side alike
            plain.append(plain_loop(dm, args.epochs))
            light.append(lightning_loop(dm, args.epochs))
            floor.append(lightning_loop(dm, args.epochs, module_cls=EmptySteps))
            iterate.append(iterate_only(dm, args.epochs))
        fast, default = default_dataloader_epoch(dm, 50)
    p, li = statistics.median(plain), statistics.median(light)
    fl, it = statistics.median(floor), statistics.median(iterate)
    ratios = sorted(b / a for a, b in zip(plain, light, strict=True))
    # Best any per-batch LightningModule could reach: the plain loop plus Lightning's
    # floor, minus the batch iteration that both already contain.
    best = sorted((a + f - i) / a for a, f, i in zip(plain, floor, iterate, strict=True))
    print(f"tiny HIGGS model, {args.epochs} epochs x {args.rounds} interleaved rounds, 1 thread:")
    print(f"  plain torch loop   {1000 * p / args.epochs:7.2f} ms/epoch (median)")
    print(f"  Lightning loop     {1000 * li / args.epochs:7.2f} ms/epoch (median)")
    print(
        f"  ratio Lightning / plain: median of rounds {statistics.median(ratios):.2f}x, "
        f"best-of-each {min(light) / min(plain):.2f}x, range {ratios[0]:.2f}-{ratios[-1]:.2f}x "
        "(target <= 1.3x)"
    )
    print(f"  Lightning floor  {1000 * fl / args.epochs:7.2f} ms/epoch (same Trainer, no-op steps)")
    print(f"  batch iteration  {1000 * it / args.epochs:7.2f} ms/epoch (no work at all)")
    print(
        f"  lowest reachable ratio, (plain + floor - iteration) / plain: "
        f"median {statistics.median(best):.2f}x, range {best[0]:.2f}-{best[-1]:.2f}x"
    )
    print(f"  default DataLoader / tensor batches (iteration only) = {default / fast:.1f}x")
    cost = progress_seconds_per_epoch()
    print(
        f"  progress line, written every epoch (worst case): {1e6 * cost:.0f} us an epoch = "
        f"{100 * cost * args.epochs / li:.2f}% of a tiny-model Lightning epoch (goal <= 1%)"
    )
    nn_drop = statistics.median(dropout_step(nn.Dropout(0.5), 20) for _ in range(3))
    fast_drop = statistics.median(dropout_step(FastDropout(0.5), 20) for _ in range(3))
    print(f"  512x4 fwd+bwd: nn.Dropout / FastDropout = {nn_drop / fast_drop:.2f}x")
    with tempfile.TemporaryDirectory() as tmp:
        report_checkpoint_cost(_higgs(Path(tmp)), Path(tmp))
    startup()


def report_checkpoint_cost(dm: ArrayDataModule, tmp: Path) -> None:
    """Resume checkpoints cost one save per ``callbacks.checkpoint.every_s`` of training."""

    every_s = 30.0  # conf/callbacks/default.yaml
    save = checkpoint_save_seconds(dm, tmp)
    print(
        f"  resume checkpoint of the 512x4 model: {1000 * save:.0f} ms a save; at one save per "
        f"{every_s:.0f} s of training (the default) that is {100 * save / every_s:.2f}% "
        "of training time (goal <= 1%)"
    )


if __name__ == "__main__":
    main()
