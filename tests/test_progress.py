"""Progress lines (terminal and pipe), the off switch, and the answer printed at the end."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from conftest import compose

from fitscope.core.progress import ENABLED_ENV, EVERY_ENV, REFRESH_S, LineProgress
from fitscope.data.download import download_file
from fitscope.pipeline.identity import run_config
from fitscope.pipeline.job import train
from fitscope.tracking.tags import config_hash

# One run's line: epochs done / max, current and best val loss, patience, rate, time left.
TRAIN_LINE = re.compile(
    r"^(?P<label>higgs-tiny seed 0): epochs (?P<done>\d+)/(?P<max>\d+) done, "
    r"val/loss (?P<val>\d\.\d{4}), best (?P<best>\d\.\d{4}) at epoch (?P<best_epoch>\d+), "
    r"patience (?P<left>\d+)/(?P<patience>\d+), (?P<rate>[\d.]+) epochs/s, "
    r"≤ (?P<eta>[\d:]+) left$"
)


def _cfg(processed_dir, tmp_path, *overrides):
    return compose(
        "+profile=debug",
        "trainer=debug",
        "logger=none",
        f"paths.data_dir={processed_dir}",
        f"paths.run_dir={tmp_path / 'run'}",
        *overrides,
    )


def test_training_logs_plain_lines_on_a_pipe_and_none_when_off(processed_dir, tmp_path, capfd):
    # progress_every_s=0: on a pipe (pytest's capture) every epoch writes one plain line.
    train(_cfg(processed_dir, tmp_path, "trainer.max_epochs=4", "progress_every_s=0"))
    lines = capfd.readouterr().err.splitlines()
    shown = [m for m in map(TRAIN_LINE.match, lines) if m]
    assert [int(m["done"]) for m in shown] == [1, 2, 3, 4]
    assert all(m["max"] == "4" and m["patience"] == "2" for m in shown)
    assert not any("\r" in line for line in lines)
    history = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert shown[-1]["best"] == f"{history['best_val_loss']:.4f}"
    assert int(shown[-1]["best_epoch"]) == history["best_epoch"]

    cfg = _cfg(processed_dir, tmp_path, "trainer.max_epochs=4", "progress=false")
    train(cfg)
    assert "epochs" not in capfd.readouterr().err
    # Neither key changes what is trained, so neither changes the config hash.
    on = _cfg(processed_dir, tmp_path, "trainer.max_epochs=4", "progress_every_s=5")
    assert config_hash(run_config(cfg)) == config_hash(run_config(on))


def test_training_draws_one_live_line_on_a_terminal(processed_dir, tmp_path, monkeypatch):
    master, slave = os.openpty()
    tty = os.fdopen(slave, "w", encoding="utf-8")
    monkeypatch.setattr(sys, "stderr", tty)
    started = time.monotonic()
    train(_cfg(processed_dir, tmp_path, "trainer.max_epochs=40", "progress_every_s=0"))
    elapsed = time.monotonic() - started
    tty.flush()
    os.set_blocking(master, False)
    out = os.read(master, 1 << 20).decode()
    tty.close()
    os.close(master)
    # Every redraw starts with a carriage return (the pty turns the final "\n" into "\r\n").
    draws = [d.removesuffix("\x1b[K") for d in out.split("\r")[1:] if d != "\n"]
    assert draws and out.endswith("\n")  # the last state stays on screen, then a newline
    states = [TRAIN_LINE.match(d) for d in draws]
    assert all(states), draws
    # At most one redraw a second (plus the final one), whatever progress_every_s says.
    assert len(draws) <= elapsed / REFRESH_S + 2
    assert (
        int(states[-1]["done"])
        == json.loads((tmp_path / "run" / "metrics.json").read_text())["epochs_run"]
    )


def test_a_live_line_is_redrawn_at_most_once_a_second():
    master, slave = os.openpty()
    with os.fdopen(slave, "w") as tty:
        line = LineProgress("step", every_s=0.0, stream=tty)
        assert line.live
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            line.show("working")
        line.close()
    os.close(master)
    assert 3 <= line.writes <= 4  # at 0 s, ~1 s, ~2 s (and a late tick)


def test_download_shows_bytes_rate_and_time_left(
    file_server, tmp_path, higgs_sample_bytes, fast_retry, monkeypatch, capfd
):
    url = file_server.add("/HIGGS.csv.gz", higgs_sample_bytes)
    monkeypatch.setenv(EVERY_ENV, "0")
    download_file([url], tmp_path / "a.gz")
    lines = capfd.readouterr().err.splitlines()
    pattern = re.compile(
        r"^download HIGGS\.csv\.gz: [\d.]+[kMG]?B of [\d.]+[kMG]?B \((\d+)%\), "
        r"[\d.]+[kMG]?B/s, [\d:?]+ left$"
    )
    percents = [int(m[1]) for m in map(pattern.match, lines) if m]
    assert len(percents) >= 2 and percents == sorted(percents) and percents[-1] == 100
    monkeypatch.setenv(ENABLED_ENV, "0")
    download_file([url], tmp_path / "b.gz")
    assert "download" not in capfd.readouterr().err


SCRIPT = """
import sys
from fitscope.cli import main
main(["evaluate", "higgs"]); main(["summary"])
heavy = ("pytorch_lightning", "lightning_fabric", "torchmetrics", "torch", "mlflow")
print("HEAVY", sorted(m for m in heavy if m in sys.modules))
"""


@pytest.mark.parametrize("seeds", [1, 2])
def test_summary_prints_the_metrics_files_and_imports_no_training_stack(tmp_path, seeds):
    import yaml

    variants = {"higgs-a": 0.60, "higgs-b": 0.65}
    for name, best in variants.items():
        for seed in range(seeds):
            d = tmp_path / "runs" / "higgs" / name / str(seed)
            d.mkdir(parents=True)
            hist = "epoch,train/loss,val/loss,train/acc,val/acc\n0,0.7,0.7,0.5,0.5\n"
            (d / "history.csv").write_text(
                hist + f"1,0.5,{best},0.6,0.6\n2,0.4,{best + 0.05},0.7,0.6\n"
            )
            run = {
                "n_params": 481,
                "best_val_loss": best + seed / 100,
                "best_val_acc": 0.6,
                "best_val_auroc": 0.65,
                "best_epoch": 1,
                "stopped_epoch": 2,
                "best_gap_loss": 0.1,
                "wall_time_s": 1.0,
                "test_loss": best + 0.013 * seed,
                "test_acc": 0.61 + 0.01 * seed,
                "test_auroc": 0.7123 - 0.002 * seed,
                "train_eval_loss": 0.5,
            }
            (d / "metrics.json").write_text(json.dumps(run))
    params = {
        "study": {"profile": "quick", "seeds": ",".join(map(str, range(seeds)))},
        "variants": {"higgs": {n: {"study": "s", "overrides": ""} for n in variants}},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # Scoring and reporting run without Lightning, torchmetrics, torch or MLflow.
    assert "HEAVY []" in out
    for name in variants:
        m = json.loads((tmp_path / "metrics" / "higgs.json").read_text())[name]
        row = next(line for line in out.splitlines() if f" {name} " in line)
        cells = [c.strip() for c in re.split(r"[│|]", row) if c.strip()]
        for key in ("test_loss", "test_acc", "test_auroc"):
            shown = f"{m[key]:.4f}" + (f" ± {m[key + '_std']:.4f}" if seeds > 1 else "")
            assert shown in cells, (key, cells)
        assert cells[0] == name and cells[1] == "481"
    assert "champion higgs: higgs-a (best val loss" in out
    assert "reports/study.md" in out and "http://127.0.0.1:5000" in out
