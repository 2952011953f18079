"""One MLflow run as fitscope writes it (:class:`RunTracker`): params, per-epoch metrics in
batches, summary, dataset, artifacts and model, kept in a pending record while the
server cannot take them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from fitscope.core.errors import first_line
from fitscope.tracking import liveness
from fitscope.tracking.liveness import create_owned_run, own_run
from fitscope.tracking.offline import PendingRecord, spool_dir
from fitscope.tracking.outcomes import FAILED, FINISHED, Outcome, end_run
from fitscope.tracking.store import environment, global_store, is_server, unreachable
from fitscope.tracking.tags import FAILURE_TAG

log = logging.getLogger(__name__)


def summary_metrics(values: dict[str, float], step: int = 0, model_id: str | None = None) -> list:
    """Single-value metrics (timestamped now) at ``step`` for one ``log_batch`` call.

    With ``model_id`` they are also the metrics of that logged model (its page shows them).
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()]


class RunTracker:
    """One MLflow run: params, tags, batched per-epoch metrics, model, final status.

    With a pending record (a run on a tracking server, :func:`open_record`) everything
    also goes into the record first; when the server stops answering, the tracker goes
    offline: training goes on, and the record keeps what was not sent until
    ``fitscope runs sync`` (:func:`sync_pending`). A run that ends with everything sent
    removes its record.
    """

    def __init__(self, client, run_id: str | None, record: PendingRecord | None = None) -> None:
        self.client, self.run_id, self.record = client, run_id, record
        self.closed = False
        self.offline = client is None
        self.system_monitor: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # DDP's spawned processes get the tracker as their fit's sink; the monitor (a
        # thread) stays with the process that started it, which stops it.
        return {**self.__dict__, "system_monitor": None}

    @property
    def pending(self) -> bool:
        """Whether this run's record waits for ``fitscope runs sync``."""
        return self.record is not None and self.offline

    @classmethod
    def create(
        cls, client, experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> RunTracker:
        from mlflow.entities import Param

        tracker = cls(client, create_owned_run(client, experiment_id, run_name, tags))
        own_run(client, tracker.run_id)
        client.log_batch(
            tracker.run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        )
        return tracker

    def _send(self, what: str, call) -> bool:
        """Run ``call`` against the server; False (and offline from now on) if it is down.

        Without a record (a local store) every error is raised as before.
        """
        if self.offline:
            return False
        try:
            call()
            return True
        except Exception as exc:
            if self.record is None or not unreachable(exc):
                raise
            self.go_offline(f"{what}: {first_line(exc)}")
            return False

    def watch_system(self, every_s: float, resumed: bool = False) -> None:
        """Sample CPU, memory, disk and network (and GPU where there is one) every
        ``every_s`` seconds into the run's System metrics tab (MLflow's own monitor, in a
        thread) until the run ends; a run offline, or without a server run, has none.
        A resumed run's samples continue its steps."""
        if self.offline or not self.run_id:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        # Its start/stop lines, and its warning when the run ends or the server goes away.
        logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
        monitor = SystemMetricsMonitor(
            self.run_id,
            sampling_interval=every_s,
            resume_logging=resumed,
            tracking_uri=self.client.tracking_uri,
        )
        monitor.start()
        self.system_monitor = monitor

    def _stop_system_watch(self) -> None:
        """Stop the monitor, after one last sample: MLflow's monitor logs a sample only
        once an interval has passed, and a short run would otherwise have none."""
        monitor, self.system_monitor = self.system_monitor, None
        if monitor is None:
            return
        if not _stopped(monitor):  # still in a call to a slow server: it ends on its own
            return
        if not self.offline:
            with contextlib.suppress(Exception):  # the record matters, not this sample
                monitor.collect_metrics()
                monitor.publish_metrics(monitor.aggregate_metrics())
                monitor.mlflow_logger.flush()

    def go_offline(self, reason: str) -> None:
        """Stop talking to the server; the record keeps the rest of the run."""
        assert self.record is not None
        self.offline = True
        # Its thread ends at its next wake-up, or after the call it is in (never joined:
        # it may be waiting on that server's retries).
        monitor, self.system_monitor = self.system_monitor, None
        if monitor is not None:
            monitor._shutdown_event.set()
        if self.run_id:
            liveness.heartbeats.discard(self.run_id)
        self.record.update(offline_reason=reason)
        log.warning(
            "the tracking server %s is unreachable (%s); training goes on, the run's record "
            "is kept in %s",
            self.record.data["tracking_uri"],
            reason,
            self.record.path,
        )

    def _log_metrics(self, metrics: list) -> None:
        if not metrics:
            return
        if self.record is not None:
            self.record.add_metrics([(m.key, m.value, m.timestamp, m.step) for m in metrics])
        self._send("logging metrics", lambda: self.client.log_batch(self.run_id, metrics=metrics))

    def log_rows(self, rows: list[dict[str, float]], step_key: str = "epoch") -> None:
        """Log per-epoch rows in one batched call (the client splits >1000 metrics)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_metrics(
            [
                Metric(key, float(value), now, int(row[step_key]))
                for row in rows
                for key, value in row.items()
                if key != step_key
            ]
        )

    def log_summary(
        self, summary: dict[str, float], step: int = 0, model_id: str | None = None
    ) -> None:
        """Single values at ``step`` (the selected epoch), on ``model_id``'s page too."""
        self._log_metrics(summary_metrics(summary, step, model_id))

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        values = {k: str(v) for k, v in tags.items()}
        if self.record is not None:
            self.record.data["tags"].update(values)
            self.record.save()
        run_tags = [RunTag(k, v) for k, v in values.items()]
        self._send("setting tags", lambda: self.client.log_batch(self.run_id, tags=run_tags))

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        call = lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path)  # noqa: E731
        if not self._send("uploading artifacts", call):
            self.record.add_artifact(path, artifact_path)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        call = lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)  # noqa: E731
        if not self._send("uploading an artifact", call):
            self.record.add_artifact(path, artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """``data`` as a JSON or YAML artifact (by the file's extension)."""
        call = lambda: self.client.log_dict(self.run_id, data, artifact_file)  # noqa: E731
        if not self._send("uploading an artifact", call):
            self.record.add_dict(data, artifact_file)

    def log_dataset(
        self, name: str, source: str, digest: str, profile: dict[str, Any], context: str
    ) -> None:
        """The data a run used, as MLflow's run input (the UI's Dataset column)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.exceptions import MlflowException

        fields = {"name": name, "source": source, "digest": digest, "profile": profile}
        if self.record is not None:
            self.record.data["datasets"].append({**fields, "context": context})
            self.record.save()
        dataset = Dataset(
            name=name,
            digest=digest[:36],  # MLflow stores at most 36 characters of a digest
            source_type="local",
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile),
        )
        inputs = [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])]

        def send() -> None:
            try:
                self.client.log_inputs(self.run_id, datasets=inputs)
            except MlflowException:
                # Concurrent jobs of a sweep (Ray, joblib) insert the same dataset row at
                # once: the store refuses the loser's insert (unique constraint); that row
                # exists now. (An unreachable server fails again and goes to _send.)
                self.client.log_inputs(self.run_id, datasets=inputs)

        self._send("logging the dataset", send)

    def log_model(self, model, example, step: int, registered_name: str | None = None):
        """Log ``model`` (eval mode) with a signature and an input example; return ModelInfo.

        ``step`` is the epoch whose weights the model holds: MLflow copies the run's
        metrics at that step onto the logged model's page. Offline, the model's weights
        (``model.mlp``) go into the record instead and None is returned.
        """
        import mlflow
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        model = model.eval()
        example = np.ascontiguousarray(example[:5], dtype=np.float32)
        info = None

        def upload() -> None:
            nonlocal info
            with torch.no_grad():
                output = model(torch.from_numpy(example)).numpy()
            # Logged to the run by id, with no active run: `mlflow.start_run` would end the
            # run on leaving its block, and only outcomes.end_run ends a run. Without an
            # active run MLflow puts the LoggedModel in $MLFLOW_EXPERIMENT_ID: the run's.
            experiment_id = self.client.get_run(self.run_id).info.experiment_id
            store = global_store(self.client.tracking_uri)  # what mlflow.pytorch writes to
            with store, environment(MLFLOW_EXPERIMENT_ID=experiment_id):
                # pip_requirements given explicitly: inferring them costs ~8 s per model.
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=infer_signature(example, output),
                    input_example=example,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    registered_model_name=registered_name,
                    step=step,
                    run_id=self.run_id,
                )

        if not self._send("logging the model", upload):
            state = {"state_dict": model.mlp.state_dict(), "task": model.task}
            self.record.save_model(state, example, step, registered_name)
        return info

    def _close(self, outcome: Outcome) -> None:
        self._stop_system_watch()
        liveness.heartbeats.discard(self.run_id)
        if self.record is not None:  # the record ends as the run does (fitscope runs sync)
            if outcome.reason is not None:
                self.record.data["tags"][FAILURE_TAG] = outcome.reason
            self.record.update(status=outcome.status, end_time=int(time.time() * 1000))
        self._send("closing the run", lambda: end_run(self.client, self.run_id, outcome))
        if self.record is not None and not self.offline:
            self.record.delete()  # everything reached the server
        self.closed = True

    def finish(self) -> None:
        self._close(Outcome(FINISHED))

    def fail(self, reason: str, status: str = FAILED) -> None:
        """End the run as FAILED (or KILLED) with the reason in the ``fitscope.failure`` tag."""
        if self.closed:
            return
        self._close(Outcome(status, reason[:8000]))  # end_run tags the reason


def _stopped(monitor: Any, wait_s: float = 2.0) -> bool:
    """Stop MLflow's monitor thread, waiting at most ``wait_s`` (its ``finish`` joins
    without a limit, and the thread may be in a call to a server that stopped answering);
    True when it ended."""
    monitor._shutdown_event.set()
    thread = monitor._process
    if thread is not None:
        thread.join(wait_s)
        if thread.is_alive():
            return False
    monitor.finish()  # the thread is gone: this only flushes
    return True


def open_record(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    **fields: Any,
) -> PendingRecord | None:
    """A pending record for a run on tracking server ``uri`` (None for a local store).

    ``fields`` go into the manifest as they are: ``experiment_description``, ``config``
    (the resolved config, to rebuild the model), ``run_id``, ``parent_run_id`` or
    ``parent_key``/``parent_name``/``parent_tags`` (a parent to find or create at sync),
    ``claimed`` (False: trained without a claim).
    """
    if not is_server(uri):
        return None
    record = PendingRecord.create(
        spool_dir(), tracking_uri=uri, experiment=experiment, run_name=run_name, **fields
    )
    record.update(params={k: str(v)[:6000] for k, v in params.items()}, tags=dict(tags))
    return record
