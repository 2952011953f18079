"""Full-size HIGGS ingest (``--ingest``): CPU seconds per 11M rows and peak memory of the
split stage on a synthetic file of the real layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import polars
from isal import igzip

from fitscope.bench.record import BENCH_JSON, record
from fitscope.data.official import HIGGS_BLOCK_BYTES, HIGGS_FILE
from fitscope.data.synthetic import write_synthetic_higgs

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
        write_synthetic_higgs(base / HIGGS_FILE, BASE_ROWS, seed=1)
        raw.mkdir()
        if file is None:
            write_synthetic_higgs(raw / HIGGS_FILE, rows)
        else:
            (raw / HIGGS_FILE).symlink_to(file.resolve())
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
        f"{HIGGS_BLOCK_BYTES >> 20} MB blocks",
    }


def report_ingest(rows: int, file: Path | None = None, out: Path = BENCH_JSON) -> None:
    """Print the ingest figures and merge them into ``reports/bench.json`` (other keys kept)."""
    figures = ingest_figures(rows, file)
    record(figures, out)
    print(
        f"  full HIGGS ingest ({figures['ingest_rows_measured']:,} synthetic rows, "
        f"{figures['ingest_engine']}): {figures['ingest_s_per_11M_rows']:.1f} CPU s per 11M "
        f"rows (goal <= 35), peak RSS {figures['ingest_peak_rss_gb']:.2f} GB (goal <= 2) "
        f"-> {out}"
    )
