"""Pending-sync records: what a run could not send to an unreachable tracking server.

A run on a tracking server keeps its record here while it trains: params, tags, every
metric point, and the artifacts and model it could not upload. The record is removed
when the run ends with everything on the server; otherwise it stays, and
``fitscope runs sync`` (``tracking.sync_pending``) uploads it when the server is back.
This module only reads and writes the files; it never talks to MLflow.

Layout: ``<spool>/<sync id>/manifest.json`` (the run's desired state), ``metrics.jsonl``
(one ``[key, value, timestamp_ms, step]`` per line, appended), ``files/`` (artifacts),
``model/`` (weights, config and input example of a model still to be logged).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fitscope.core.fileio import atomic_path, write_json
from fitscope.core.process import Owner

SPOOL_ENV = "FITSCOPE_PENDING_DIR"
SPOOL_NAME = "mlruns-pending"
MANIFEST = "manifest.json"


def spool_dir() -> Path:
    """``$FITSCOPE_PENDING_DIR``, else ``mlruns-pending`` beside the default ``mlflow.db``
    (the DVC repository a stage runs for, or the current directory)."""
    if os.environ.get(SPOOL_ENV):
        return Path(os.environ[SPOOL_ENV])
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()) / SPOOL_NAME


class PendingRecord:
    """One run's record on disk; ``data`` is the manifest (saved atomically on change)."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    @classmethod
    def create(cls, spool: Path, **fields: Any) -> PendingRecord:
        """A new record (status RUNNING, owned by this process) with ``fields``."""
        sync_id = uuid.uuid4().hex
        owner = Owner.current()
        data = {
            "sync_id": sync_id,
            "run_id": None,  # the server's run, once it exists
            "status": "RUNNING",
            "start_time": int(time.time() * 1000),
            "end_time": None,
            "owner": owner.token(),
            "params": {},
            "tags": {},
            "datasets": [],
            "artifacts": [],  # [file under files/, artifact_path or null]
            "model": None,
            **fields,
        }
        record = cls(spool / sync_id, data)
        (record.path / "files").mkdir(parents=True)
        record.save()
        return record

    @classmethod
    def load(cls, path: Path) -> PendingRecord:
        return cls(path, json.loads((path / MANIFEST).read_text()))

    @classmethod
    def all(cls, spool: Path) -> list[PendingRecord]:
        """Every complete record in ``spool``, oldest first."""
        paths = sorted(spool.glob(f"*/{MANIFEST}")) if spool.is_dir() else []
        return sorted((cls.load(p.parent) for p in paths), key=lambda r: r.data["start_time"])

    @property
    def sync_id(self) -> str:
        return self.data["sync_id"]

    def save(self) -> None:
        write_json(self.path / MANIFEST, self.data)

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.save()

    def owner_alive(self) -> bool:
        """Whether the process that writes this record may still be running."""
        owner = Owner.parse(self.data.get("owner"))
        return owner is not None and owner.alive() is not False

    def add_metrics(self, points: list[tuple[str, float, int, int]]) -> None:
        """Append metric points ``(key, value, timestamp_ms, step)``; flushed to disk."""
        with open(self.path / "metrics.jsonl", "a") as fh:
            fh.writelines(json.dumps(list(p)) + "\n" for p in points)
            fh.flush()
            os.fsync(fh.fileno())

    def metrics(self) -> list[tuple[str, float, int, int]]:
        path = self.path / "metrics.jsonl"
        if not path.is_file():
            return []
        # A line cut short by a crash mid-write is the only one that may not parse.
        points = []
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                key, value, stamp, step = json.loads(line)
                points.append((key, float(value), int(stamp), int(step)))
        return points

    def _slot(self) -> Path:
        """A new folder under ``files/`` for one artifact (its own name is kept inside)."""
        slot = self.path / "files" / str(len(self.data["artifacts"]))
        slot.mkdir()
        return slot

    def add_artifact(self, src: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the record, to be uploaded under ``artifact_path``."""
        src = Path(src)
        slot = self._slot()
        if src.is_dir():
            shutil.copytree(src, slot / src.name)
        else:
            shutil.copy2(src, slot / src.name)
        self.data["artifacts"].append([f"{slot.name}/{src.name}", artifact_path])
        self.save()

    def add_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """A JSON/YAML artifact, written into the record as its own file."""
        import yaml

        folder, _, name = artifact_file.rpartition("/")
        slot = self._slot()
        text = json.dumps(data, indent=2) if name.endswith(".json") else yaml.safe_dump(data)
        (slot / name).write_text(text)
        self.data["artifacts"].append([f"{slot.name}/{name}", folder or None])
        self.save()

    def save_model(self, state: dict[str, Any], example, step: int, registered: str | None):
        """Weights + config (``torch.save``, loadable with ``weights_only``) and input example."""
        import numpy as np
        import torch

        folder = self.path / "model"
        folder.mkdir(exist_ok=True)
        with atomic_path(folder / "model.pt") as tmp:
            torch.save(state, tmp)
        np.save(folder / "example.npy", example)
        self.update(model={"step": step, "registered_name": registered})

    def delete(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def lock(self) -> Iterator[bool]:
        """Hold the record's lock; yields False when another process holds it (a sync)."""
        with open(self.path / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
