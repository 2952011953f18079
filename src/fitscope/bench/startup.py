"""Start-up vs work of each pipeline command (``--startup``): import time read from
``python -X importtime``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from fitscope.bench.record import BENCH_JSON, record

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
    params["diagnostics"] = {}  # they train variants these params no longer have
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
    record(figures, out)
    print(f"  written to {out} (startup_s, work_s)")
    return figures
