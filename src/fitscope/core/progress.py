"""Progress of long steps: one live line on a terminal, a plain line every N s elsewhere.

On a terminal the line is redrawn in place (``\\r``) at most once per ``REFRESH_S``; on a
pipe or file (CI, ``dvc repro > log``) a plain line is written every ``every_s`` seconds,
so a captured log shows the step is alive without one line per epoch. Callers only
``show`` a state; this module decides whether and how it is written. Numbers are
formatted by tqdm's helpers (bytes, durations), which Lightning already depends on.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO

from tqdm import tqdm

REFRESH_S = 1.0  # at most one redraw a second on a terminal
DEFAULT_EVERY_S = 30.0  # one plain line every 30 s when not on a terminal
# Steps without a Hydra config (fetch, split: DVC runs them with params.yaml only) take
# the switch and the interval from the environment; training takes them from its config.
ENABLED_ENV, EVERY_ENV = "FITSCOPE_PROGRESS", "FITSCOPE_PROGRESS_EVERY_S"


def env_settings() -> tuple[bool, float]:
    """``(enabled, every_s)`` from FITSCOPE_PROGRESS (``0``/``false`` = off) and
    FITSCOPE_PROGRESS_EVERY_S."""
    enabled = os.environ.get(ENABLED_ENV, "1").strip().lower() not in ("0", "false", "no")
    try:
        every_s = float(os.environ.get(EVERY_ENV, DEFAULT_EVERY_S))
    except ValueError:
        every_s = DEFAULT_EVERY_S
    return enabled, max(every_s, 0.0)


def duration(seconds: float) -> str:
    """``1:02:03`` / ``02:03`` (tqdm's format); ``?`` when unknown."""
    return tqdm.format_interval(seconds) if seconds >= 0 and seconds != float("inf") else "?"


def size(n: float) -> str:
    """``2.80GB``, ``512kB`` (decimal units, tqdm's format)."""
    return f"{tqdm.format_sizeof(n)}B"


class LineProgress:
    """Writes the state of one step as ``<label>: <text>``, throttled as described above.

    ``enabled=False`` writes nothing (the ``progress=false`` switch). ``force=True`` in
    ``show`` bypasses the throttle (the final state). ``close`` ends a terminal's live line.
    """

    def __init__(
        self,
        label: str,
        *,
        every_s: float = DEFAULT_EVERY_S,
        stream: IO[str] | None = None,
        enabled: bool = True,
        live: bool | None = None,
    ) -> None:
        self.label, self.every_s, self.enabled = label, every_s, enabled
        self.stream = stream if stream is not None else sys.stderr
        # live=None: a live line only on a terminal (a Lightning-free isatty check).
        self.live = _isatty(self.stream) if live is None else live
        self.interval = REFRESH_S if self.live else every_s
        self.last: float | None = None  # when the last line was written
        self.writes = 0
        self._drawn = False

    def __getstate__(self) -> dict:
        # ddp_spawn pickles the callbacks into its worker processes: a stream cannot be
        # pickled, and the workers write to their own stderr (the same terminal or pipe).
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.stream = sys.stderr

    def due(self) -> bool:
        """Whether a ``show`` now would write (callers may skip building the text)."""
        if not self.enabled:
            return False
        return self.last is None or time.monotonic() - self.last >= self.interval

    def show(self, text: str, *, force: bool = False) -> None:
        if not self.enabled or not (force or self.due()):
            return
        line = f"{self.label}: {text}"
        if self.live:
            # \x1b[K clears what a longer previous line left on the right.
            self.stream.write(f"\r{line}\x1b[K")
            self._drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.last = time.monotonic()
        self.writes += 1

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class ByteProgress:
    """Bytes, rate and time left of a transfer: ``ByteProgress(total, label)``, ``update(n)``
    per block, ``close()`` at the end (or use it as a context manager).

    ``total=None`` (size unknown) shows bytes and rate only. Used by downloads and by the
    full-file ingest; switched and paced by the environment (``env_settings``).
    """

    def __init__(
        self,
        total: int | None,
        label: str,
        *,
        initial: int = 0,
        stream: IO[str] | None = None,
    ) -> None:
        self.total, self.done, self.initial = total, initial, initial
        enabled, every_s = env_settings()
        self.line = LineProgress(label, every_s=every_s, stream=stream, enabled=enabled)
        self.started = time.monotonic()

    def text(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = (self.done - self.initial) / elapsed
        if self.total:
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            pct = 100 * self.done / self.total
            return (
                f"{size(self.done)} of {size(self.total)} ({pct:.0f}%), {size(rate)}/s, "
                f"{duration(left)} left"
            )
        return f"{size(self.done)}, {size(rate)}/s"

    def update(self, n: int) -> None:
        self.done += n
        if self.line.due():
            self.line.show(self.text())

    def close(self) -> None:
        if self.line.writes:  # a step that took under one interval stays silent
            self.line.show(self.text(), force=True)
        self.line.close()

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def job_done(
    sweep_dir: str | Path, total: int, label: str, *, stream: IO[str] | None = None
) -> int:
    """Count one finished job of a sweep; print ``sweep <label>: <done>/<total> jobs done``.

    Jobs may run in separate worker processes: each appends one byte to a file in the
    sweep directory (O_APPEND writes do not interleave) and counts the bytes.
    """
    path = Path(sweep_dir) / JOBS_DONE_FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    done = path.stat().st_size
    out = stream if stream is not None else sys.stderr
    out.write(f"sweep {label}: {done}/{total} jobs done\n")
    out.flush()
    return done


JOBS_DONE_FILE = "jobs_done"  # in a sweep directory: one byte per finished job
SWEEP_JOBS_ENV = "FITSCOPE_SWEEP_JOBS"  # a sweep's job count, for the "jobs done" lines
