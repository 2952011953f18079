"""MLflow tracking: the one place that resolves the tracking URI and talks to MLflow.

Besides params, metrics and models, it keeps the run statuses honest: every run fitscope
opens records its owner (host, pid, process start time) and a heartbeat; runs whose owner
is gone are reconciled to KILLED; a config is claimed before it is trained, so one config
trains once even when identical jobs race (see :func:`claim_run`, docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fitscope.errors import FitscopeError
from fitscope.lifecycle import Owner, block_signals_in_this_thread
from fitscope.pending import PendingRecord, spool_dir

# A sweep's parent run of each study its jobs train (JSON: study -> run id). A DVC train
# stage's jobs span several studies, each its own MLflow experiment with its own parent.
PARENT_ENV = "FITSCOPE_PARENT_RUN_ID"
# A sweep started while its tracking server was unreachable hands its jobs each parent's
# key, name and tags instead (JSON: study -> spec): a job finds or creates its parent
# itself, or keeps the spec in its pending record for `fitscope runs sync`.
PARENT_SPEC_ENV = "FITSCOPE_PARENT_SPEC"


def sweep_parents(env: str = PARENT_ENV) -> dict[str, Any]:
    """What a sweep handed its jobs in ``env`` (``PARENT_ENV`` or ``PARENT_SPEC_ENV``), by study."""
    value = os.environ.get(env)
    return json.loads(value) if value else {}


TAG = "fitscope."  # prefix of our own tags
PARENT_TAG = "mlflow.parentRunId"  # what the MLflow UI nests runs by
CONFIG_HASH_TAG = f"{TAG}config_hash"
OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_STARTED_TAG = (
    f"{TAG}owner.host",
    f"{TAG}owner.pid",
    f"{TAG}owner.started",
)
HEARTBEAT_TAG = f"{TAG}heartbeat"  # unix seconds of the owner's last sign of life
FAILURE_TAG = f"{TAG}failure"  # why a run is FAILED or KILLED
RECONCILED_TAG = f"{TAG}reconciled"  # when and by whom a dead owner's run was closed

# Defaults; the environment variables override them (seconds).
HEARTBEAT_S, HEARTBEAT_ENV = 30.0, "FITSCOPE_HEARTBEAT_S"
STALE_AFTER_S, STALE_AFTER_ENV = 600.0, "FITSCOPE_STALE_AFTER_S"
CLAIM_SETTLE_S, CLAIM_SETTLE_ENV = 3.0, "FITSCOPE_CLAIM_SETTLE_S"

log = logging.getLogger(__name__)


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from environment variable ``name``, else ``default``."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise FitscopeError(
            f"{name}={raw!r} is not a positive number of seconds. Fix: set it to e.g. "
            f"{default:g} or unset it"
        )
    return value


def resolve_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<root>/mlflow.db`` (as `mlflow ui`).

    The root is the DVC repository a stage runs for (``DVC_ROOT``, which DVC points at
    the user's workspace also for queued experiments running in a temporary copy), or
    the current directory outside DVC.
    """
    root = Path(os.environ.get("DVC_ROOT") or Path.cwd())
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


def where_to_look(uri: str | None = None) -> str:
    """Where a person opens the runs of ``uri``: the tracking server, or a local `mlflow ui`."""
    uri = uri or resolve_tracking_uri()
    if is_server(uri):
        return f"open {uri}"
    return "`.venv/bin/mlflow ui`, then open http://127.0.0.1:5000"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation and experiment creation across processes (SQLite only).

    Concurrent first opens of a fresh SQLite file race on schema migrations and can
    corrupt it; concurrent ``create_experiment`` calls race on the unique name.
    """
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# MLflow's defaults retry an unreachable server for about 4 minutes before failing;
# these make a store problem a one-line error within seconds (a user's own values win).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _probe_sqlite_write(path: Path) -> None:
    """Write (the same header value) and roll back: a read-only file or folder fails here."""
    import sqlite3

    con = sqlite3.connect(path, timeout=60)
    try:
        con.execute("BEGIN IMMEDIATE")
        version = con.execute("PRAGMA user_version").fetchone()[0]
        con.execute(f"PRAGMA user_version = {int(version)}")
        con.rollback()
    finally:
        con.close()


def get_client(uri: str | None = None):
    """An MlflowClient on an initialised, writable store (created under a lock on first use).

    A store that cannot be read, written or reached is a one-line FitscopeError naming
    the URI, raised before any training.
    """
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    from mlflow.tracking import MlflowClient

    for key, value in HTTP_LIMITS.items():
        os.environ.setdefault(key, value)
    uri = uri or resolve_tracking_uri()
    db = _sqlite_path(uri)
    try:
        with _store_lock(uri):
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            client.search_experiments(max_results=1)  # forces table creation/migration
            if db is not None:
                _probe_sqlite_write(db)
    except Exception as exc:
        reason = first_line(exc)
        fix = (
            "make the file and its folder writable, or point MLFLOW_TRACKING_URI elsewhere"
            if db is not None
            else "start the tracking server or correct MLFLOW_TRACKING_URI (and credentials)"
        )
        error = ServerUnreachable if server_down(uri, exc) else FitscopeError
        raise error(f"cannot use the MLflow tracking store {uri} ({reason}). Fix: {fix}") from None
    return client


class ServerUnreachable(FitscopeError):
    """The tracking server did not answer (refused, timed out, 5xx): it may come back."""


def is_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server (HTTP), the only store a run can be cut off from."""
    return uri.startswith(("http://", "https://"))


def server_down(uri: str, exc: BaseException) -> bool:
    """Whether ``exc`` means that tracking server ``uri`` is down: training goes on offline."""
    return is_server(uri) and unreachable(exc)


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the server is down or cut off, not that the request is wrong.

    Refused or reset connections, timeouts and "too many 5xx responses" (a proxy in
    front of a dead server) count; an unknown host name (a typo), 401/403/404 and a
    bad scheme do not: they stay one-line errors.
    """
    if isinstance(exc, ServerUnreachable):
        return True
    names: set[str] = set()
    seen: BaseException | None = exc
    while seen is not None and len(names) < 20:
        names.add(type(seen).__name__)
        seen = seen.__cause__ or seen.__context__
    if names & {"NameResolutionError", "gaierror", "LocationParseError", "InvalidURL"}:
        return False
    if names & {
        "ConnectionError",
        "ConnectionRefusedError",
        "ConnectionResetError",
        "Timeout",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutError",
        "NewConnectionError",
        "ProtocolError",
        "RemoteDisconnected",
        "ConnectionAbortedError",
    }:
        return True
    return "too many 5" in str(exc) and "error responses" in str(exc)


NOTE_TAG = "mlflow.note.content"  # the description the MLflow UI shows (runs, experiments)
# MLflow 3's UI opens an experiment on its GenAI overview unless the experiment says it is
# model training (the kinds are in the UI bundle: genai_development, custom_model_development).
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"


def ensure_experiment(client, name: str, description: str | None = None) -> str:
    """Id of experiment ``name``, created (artifacts under ./mlartifacts) if missing.

    The experiment is marked as model training (the UI then opens on its runs) and gets
    ``description`` when it has none yet (a user's own edit in the UI is kept).
    """
    with _store_lock(client.tracking_uri):
        exp = client.get_experiment_by_name(name)
        if exp is None:
            db = _sqlite_path(client.tracking_uri)
            location = str(db.parent / "mlartifacts" / name) if db is not None else None
            from mlflow.exceptions import MlflowException

            try:
                exp_id = client.create_experiment(name, artifact_location=location)
                tags: dict[str, str] = {}
            except MlflowException:
                # A server has no lock to hold: another job created it first (name taken).
                exp = client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp is not None:
            exp_id, tags = exp.experiment_id, exp.tags
        if tags.get(KIND_TAG) != KIND_TRAINING:
            _set_experiment_tag(client, exp_id, KIND_TAG, KIND_TRAINING)
        if description and not tags.get(NOTE_TAG):
            _set_experiment_tag(client, exp_id, NOTE_TAG, description)
        return exp_id


def _set_experiment_tag(client, exp_id: str, key: str, value: str) -> None:
    """Set an experiment tag that concurrent jobs may be setting at the same moment.

    On a server the store inserts a new tag row: of two jobs inserting it at once, the
    loser's insert is refused (HTTP 400, seen with 8 jobs on a SQLite-backed server).
    The tag exists then, set by the winner, which is all this needs.
    """
    from mlflow.exceptions import MlflowException

    try:
        client.set_experiment_tag(exp_id, key, value)
    except MlflowException:
        if key not in client.get_experiment(exp_id).tags:
            raise


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> ``{"a.b": value}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_hash(config: dict[str, Any]) -> str:
    """A stable short hash of a (resolved) config mapping."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# Files that `dvc exp run` / `dvc repro` write themselves before and while stages run
# (params.yaml from -S, dvc.lock after each stage): inside a DVC stage they do not make
# the code a run was trained with differ from the commit.
DVC_WRITTEN = ("params.yaml", "dvc.lock")


def git_state(cwd: str | Path = ".", ignore: tuple[str, ...] = ()) -> tuple[str, bool]:
    """(commit, dirty) of the repository, or ("unknown", False) outside git.

    Changes to the paths in ``ignore`` (relative to the repository root) do not count.
    """
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--no-renames"],
            cwd=cwd,
            capture_output=True,
            text=True,
        ).stdout.splitlines()
        return commit, any(line[3:] not in ignore for line in status if line.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def source_tags(entry: str) -> dict[str, str]:
    """MLflow's standard source tags and fitscope's git/DVC provenance for a new run.

    ``entry`` names what started the run (``mlflow.source.name``). Inside a DVC stage the
    files DVC writes itself are left out of the dirtiness check, and the tag says so; the
    DVC experiment name (``dvc exp run``) is recorded when there is one.
    """
    import getpass

    in_dvc = bool(os.environ.get("DVC_STAGE"))
    ignore = DVC_WRITTEN if in_dvc else ()
    commit, dirty = git_state(ignore=ignore)
    tags = {
        "mlflow.user": getpass.getuser(),
        "mlflow.source.name": entry,
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        f"{TAG}git_dirty": str(dirty).lower(),
    }
    if ignore:
        tags[f"{TAG}git_dirty_ignores"] = f"{', '.join(ignore)} (written by DVC itself)"
    if os.environ.get("DVC_EXP_NAME"):
        tags[f"{TAG}dvc_exp"] = os.environ["DVC_EXP_NAME"]
    return tags


def tag_equals(key: str, value: str) -> str:
    """An MLflow filter clause ``tags.`key` = '<value>'`` with ``value`` safely quoted.

    MLflow's filter parser takes a string in single or double quotes and has no escape
    for a quote inside it, so a value is quoted with a kind it does not contain; one
    holding both kinds, a backslash or a backquote cannot be expressed and is refused.
    """
    if "`" in key or any(c in value for c in "\\`") or ("'" in value and '"' in value):
        raise FitscopeError(
            f"cannot search MLflow for the tag value {value!r}. Fix: use a name without "
            "quotes, backslashes or backquotes"
        )
    quote = '"' if "'" in value else "'"
    return f"tags.`{key}` = {quote}{value}{quote}"


def commit_parent_key(key: str, commit: str) -> str:
    """An explicit parent key scoped to a git commit: one parent per key and commit."""
    return f"{key}@{commit[:12]}"


def _summary_metrics(values: dict[str, float], step: int = 0, model_id: str | None = None) -> list:
    """Single-value metrics (timestamped now) at ``step`` for one ``log_batch`` call.

    With ``model_id`` they are also the metrics of that logged model (its page shows them).
    """
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step, model_id=model_id) for k, v in values.items()]


def owner_tags(owner: Owner | None = None) -> dict[str, str]:
    """Who holds a run open, and their first heartbeat."""
    owner = owner or Owner.current()
    return {
        OWNER_HOST_TAG: owner.host,
        OWNER_PID_TAG: str(owner.pid),
        OWNER_STARTED_TAG: repr(owner.started),
        HEARTBEAT_TAG: f"{time.time():.3f}",
    }


def run_owner(run) -> Owner | None:
    tags = run.data.tags
    try:
        return Owner(tags[OWNER_HOST_TAG], int(tags[OWNER_PID_TAG]), float(tags[OWNER_STARTED_TAG]))
    except (KeyError, ValueError):
        return None


def dead_reason(run, stale_after_s: float, now: float | None = None) -> str | None:
    """Why a RUNNING run's owner is gone, or None while it may still be alive.

    On this host the owner's pid and start time decide (a reused pid is not the owner).
    For another host, or a run without owner tags, only the heartbeat (or the start time)
    can: it is dead after ``stale_after_s`` seconds without one. That compares this
    host's clock with the owner's: keep ``stale_after_s`` far above the clock skew.
    """
    owner = run_owner(run)
    if owner is not None and owner.on_this_host():
        return None if owner.alive() else f"its process ({owner}) is gone"
    try:
        last = float(run.data.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        last = run.info.start_time / 1000
    age = (time.time() if now is None else now) - last
    if age <= stale_after_s:
        return None
    who = f"host {owner.host}" if owner is not None else "its process (no owner recorded)"
    return f"no heartbeat from {who} for {age:.0f} s (stale after {stale_after_s:g} s)"


@dataclass(frozen=True)
class Reconciled:
    """A RUNNING run whose owner was gone, now KILLED."""

    run_id: str
    experiment_id: str
    run_name: str
    reason: str


def reconcile(
    client, experiment_ids: list[str], stale_after_s: float | None = None
) -> list[Reconciled]:
    """End as KILLED every fitscope run in the experiments that is RUNNING without an owner.

    The reason goes into the ``fitscope.failure`` tag, the time and the reconciling process
    into ``fitscope.reconciled``. Runs that fitscope did not open are left alone.
    """
    from mlflow.entities import RunTag

    if stale_after_s is None:
        stale_after_s = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
    runs = client.search_runs(
        experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=5000
    )
    now = time.time()
    stamp = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} by {Owner.current()}"
    done = []
    for run in runs:
        if not any(k.startswith(TAG) for k in run.data.tags):
            continue
        reason = dead_reason(run, stale_after_s, now)
        if reason is None:
            continue
        run_id = run.info.run_id
        tags = [RunTag(FAILURE_TAG, f"reconciled: {reason}"), RunTag(RECONCILED_TAG, stamp)]
        client.log_batch(run_id, tags=tags)
        client.set_terminated(run_id, status="KILLED")
        done.append(Reconciled(run_id, run.info.experiment_id, run.info.run_name or "", reason))
    return done


def existing_client(uri: str | None = None):
    """A client on a store that must already exist (a local SQLite file is not created)."""
    uri = uri or resolve_tracking_uri()
    path = _sqlite_path(uri)
    if path is not None and not path.is_file():
        raise FitscopeError(
            f"no MLflow store at {path}. Fix: run from the directory that holds mlflow.db, "
            "or set MLFLOW_TRACKING_URI"
        )
    return get_client(uri)


def reconcile_store(
    client, experiment: str | None = None, stale_after_s: float | None = None
) -> tuple[list[Reconciled], list, dict[str, str]]:
    """Reconcile one experiment (by name) or all: (runs KILLED, runs still RUNNING, names).

    ``names`` maps experiment ids to names.
    """
    if experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise FitscopeError(
                f"no MLflow experiment named {experiment!r} in {client.tracking_uri}. Fix: "
                "check the name (`mlflow experiments search`), or leave --experiment out"
            )
        exps = [exp]
    else:
        exps = client.search_experiments()
    names = {e.experiment_id: e.name for e in exps}
    changed = reconcile(client, list(names), stale_after_s) if names else []
    running = (
        client.search_runs(
            list(names), filter_string="attributes.status = 'RUNNING'", max_results=5000
        )
        if names
        else []
    )
    return changed, running, names


class _Heartbeats:
    """One daemon thread per process stamps ``fitscope.heartbeat`` on the runs it holds open."""

    def __init__(self) -> None:
        self._runs: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, client, run_id: str) -> None:
        interval = env_seconds(HEARTBEAT_ENV, HEARTBEAT_S)
        with self._lock:
            self._runs[run_id] = client
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._beat, args=(interval,), name="fitscope-heartbeat", daemon=True
                )
                self._thread.start()

    def discard(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)

    def _beat(self, interval: float) -> None:
        block_signals_in_this_thread()
        while True:
            time.sleep(interval)
            with self._lock:
                runs = list(self._runs.items())
            for run_id, client in runs:
                try:
                    client.set_tag(run_id, HEARTBEAT_TAG, f"{time.time():.3f}")
                except Exception as exc:  # a missed beat is not worth a crashed run
                    log.debug("heartbeat for run %s failed: %s", run_id, exc)


heartbeats = _Heartbeats()


def find_or_create_parent(
    client, experiment_id: str, key: str, run_name: str, tags: dict[str, str] | None = None
) -> str:
    """The parent run tagged ``fitscope.parent_key=key``; created if absent (under the lock).

    This process becomes its owner: a parent found again (a re-run sweep) is RUNNING again
    until :func:`close_parent`, with this process's owner tags and heartbeat.
    """
    reconcile(client, [experiment_id])
    with _store_lock(client.tracking_uri):
        runs = client.search_runs(
            [experiment_id],
            filter_string=tag_equals(f"{TAG}parent_key", key),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if runs:
            run_id = runs[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            for stale in (FAILURE_TAG, RECONCILED_TAG):
                if stale in runs[0].data.tags:
                    client.delete_tag(run_id, stale)
            from mlflow.entities import RunTag

            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])
        else:
            run_tags = {f"{TAG}parent_key": key, f"{TAG}role": "parent", **(tags or {})}
            run_id = client.create_run(
                experiment_id, run_name=run_name, tags={**run_tags, **owner_tags()}
            ).info.run_id
            run_id = _oldest_parent(client, experiment_id, key, run_id)
    heartbeats.add(client, run_id)
    return run_id


def _oldest_parent(client, experiment_id: str, key: str, created: str) -> str:
    """The parent to use after creating ``created``: a server has no store lock, so two
    jobs may create the same parent at once; both keep the oldest and the other is deleted."""
    same = client.search_runs([experiment_id], filter_string=tag_equals(f"{TAG}parent_key", key))
    oldest = min(same, key=lambda r: (r.info.start_time, r.info.run_id), default=None)
    if oldest is None or oldest.info.run_id == created:
        return created
    client.delete_run(created)
    return oldest.info.run_id


def _effective_statuses(children: list) -> dict[str, str]:
    """One status per config: FINISHED if any run of it finished, else its newest run's."""
    by_config: dict[str, list] = {}
    for run in children:
        by_config.setdefault(run.data.tags.get(CONFIG_HASH_TAG, run.info.run_id), []).append(run)
    statuses = {}
    for chash, runs in by_config.items():
        if any(r.info.status == "FINISHED" for r in runs):
            statuses[chash] = "FINISHED"
        else:
            statuses[chash] = max(runs, key=lambda r: r.info.start_time).info.status
    return statuses


def close_parent(
    client,
    parent_id: str,
    objective: str | None = None,
    *,
    interrupted: bool = False,
    failed: bool = False,
    tolerate_failures: bool = False,
) -> dict[str, Any] | None:
    """End a sweep's parent run with its best child's params and objective.

    Status: KILLED when the sweep was interrupted or a config's latest run was killed;
    FAILED when the sweep itself failed, no child finished, or (unless
    ``tolerate_failures``, as in a search) a config's runs all failed; else FINISHED.
    Configs still RUNNING under another live sweep do not count (that sweep closes the
    parent again when it ends). Returns the best child's summary, or None when no child
    finished. ``objective`` defaults to the one the children were trained with.
    """
    from mlflow.entities import RunTag

    heartbeats.discard(parent_id)
    experiment_id = client.get_run(parent_id).info.experiment_id
    reconcile(client, [experiment_id])  # dead children are KILLED first
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=tag_equals(PARENT_TAG, parent_id),
        max_results=5000,
    )
    if objective is None:
        objective = next(
            (c.data.params["objective"] for c in children if "objective" in c.data.params),
            "val/loss",
        )
    key = f"best/{objective}"
    done = [r for r in children if r.info.status == "FINISHED" and key in r.data.metrics]
    counts = {
        "children": len(children),
        "children_finished": len(done),
        "children_failed": sum(r.info.status == "FAILED" for r in children),
        "children_killed": sum(r.info.status == "KILLED" for r in children),
    }
    effective = list(_effective_statuses(children).values())
    status, reason = "FINISHED", None
    if interrupted:
        status, reason = "KILLED", "the sweep was interrupted"
    elif "KILLED" in effective:
        status, reason = "KILLED", f"{effective.count('KILLED')} config(s) ended KILLED"
    elif failed:
        status, reason = "FAILED", "the sweep failed (see its output)"
    elif not done:
        status, reason = "FAILED", "no child run finished"
    elif "FAILED" in effective and not tolerate_failures:
        status, reason = "FAILED", f"{effective.count('FAILED')} config(s) failed"
    # "sweep/..." keeps the counts in their own chart group, apart from the best metrics.
    best, tags, metrics = None, [], {f"sweep/{k}": v for k, v in counts.items()}
    if done:
        sign = 1 if objective.endswith("loss") else -1
        run = min(done, key=lambda r: sign * r.data.metrics[key])
        best = {"run_id": run.info.run_id, "value": run.data.metrics[key], **counts}
        metrics[key] = run.data.metrics[key]
        tags = [
            RunTag(f"{TAG}best_run_id", run.info.run_id),
            RunTag(f"{TAG}best_variant", run.data.tags.get(f"{TAG}variant", "")),
            *(
                RunTag(f"best_param.{k}"[:250], v[:8000])
                for k, v in run.data.params.items()
                if k.startswith(("optimizer.", "regularization.", "model."))
            ),
        ]
    if reason is not None:
        tags.append(RunTag(FAILURE_TAG, reason))
    elif FAILURE_TAG in parent.data.tags:
        client.delete_tag(parent_id, FAILURE_TAG)  # from an earlier attempt or a reconcile
    client.log_batch(parent_id, metrics=_summary_metrics(metrics), tags=tags)
    client.set_terminated(parent_id, status=status)
    return best


def register_version(
    client,
    name: str,
    model_uri: str,
    run_id: str,
    alias: str,
    tags: dict[str, str],
    description: str,
    model_description: str,
) -> str:
    """Register ``model_uri`` as a new version of ``name``, point ``alias`` at it.

    The version carries ``tags`` and ``description``; the registered model gets
    ``model_description`` when it is created. Returns the version number.
    """
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=model_description)
    # A tracking server only accepts a logged model's `models:/<model_id>` source when the
    # request names that model id too (a local store infers it).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name, model_uri, run_id=run_id, tags=tags, description=description, model_id=model_id
    )
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


@dataclass
class Claim:
    """The outcome of :func:`claim_run`: exactly one of the three is set."""

    tracker: RunTracker | None = None  # this process won: its run, RUNNING, heartbeat on
    finished: Any = None  # a FINISHED run of this config (skip unless force)
    holder: Any = None  # the live run that holds this config (skip, even with force)
    reconciled: list[Reconciled] = field(default_factory=list)


def _blocker(client, experiment_id: str, chash: str, force: bool, mine=None) -> Claim | None:
    """What keeps this process from training ``chash`` (None: nothing, or ``mine`` wins)."""
    runs = client.search_runs(
        [experiment_id], filter_string=tag_equals(CONFIG_HASH_TAG, chash), max_results=1000
    )
    if not force:
        finished = [r for r in runs if r.info.status == "FINISHED"]
        if finished:
            return Claim(finished=max(finished, key=lambda r: r.info.start_time))
    stale_after = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
    live = [r for r in runs if r.info.status == "RUNNING" and not dead_reason(r, stale_after)]
    if not live:
        return None
    first = min(live, key=lambda r: (r.info.start_time, r.info.run_id))
    if mine is not None and first.info.run_id == mine:
        return None
    return Claim(holder=first)


def claim_run(
    client,
    experiment_id: str,
    chash: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str],
    *,
    force: bool = False,
    settle_s: float | None = None,
    exact: bool | None = None,
) -> Claim:
    """Claim config ``chash`` with a RUNNING run, unless a live run or a FINISHED one holds it.

    MLflow has no compare-and-set, so on a shared store (a tracking server, a database)
    the claim is: reconcile dead owners' runs; create the claim run; wait ``settle_s``;
    list the live RUNNING runs (and, unless ``force``, the FINISHED ones) of the config;
    the earliest ``(start_time, run_id)`` wins. A loser ends its claim KILLED and deletes
    it (``delete_run``), so no stray run remains. The start times come from each client's
    clock: this is exact as long as ``settle_s`` exceeds the clock skew between the hosts
    plus the store's write latency (NTP keeps skew to milliseconds; the default is 3 s).

    On a local SQLite store (``exact``, the default there) the whole check-and-create
    runs under the store's file lock, which makes it exact and needs no settle time.
    """
    from mlflow.entities import Param, RunTag

    if exact is None:
        exact = _sqlite_path(client.tracking_uri) is not None
    if settle_s is None:
        settle_s = 0.0 if exact else env_seconds(CLAIM_SETTLE_ENV, CLAIM_SETTLE_S)
    lock = _store_lock(client.tracking_uri) if exact else contextlib.nullcontext()
    with lock:
        reconciled = reconcile(client, [experiment_id])
        blocker = _blocker(client, experiment_id, chash, force)
        if blocker is not None:
            blocker.reconciled = reconciled
            return blocker
        run_tags = {**tags, CONFIG_HASH_TAG: chash, **owner_tags()}
        run_id = client.create_run(experiment_id, run_name=run_name, tags=run_tags).info.run_id
        if settle_s:
            time.sleep(settle_s)
            blocker = _blocker(client, experiment_id, chash, force, mine=run_id)
            if blocker is not None:
                held_by = (blocker.holder or blocker.finished).info.run_id
                client.log_batch(run_id, tags=[RunTag(f"{TAG}claim_lost_to", held_by)])
                client.set_terminated(run_id, status="KILLED")
                client.delete_run(run_id)
                blocker.reconciled = reconciled
                return blocker
    heartbeats.add(client, run_id)
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())])
    return Claim(tracker=RunTracker(client, run_id), reconciled=reconciled)


def take_over(client, claim: RunTracker, run_id: str, chash: str, monitor: str):
    """Continue the KILLED run ``run_id`` of config ``chash`` instead of the new ``claim``.

    The old run becomes RUNNING under this process (owner tags, heartbeat) before the
    claim run is deleted, so a live run holds the config throughout. Returns the old run's
    tracker and the last epoch it logged (-1 if none), or None (and nothing changes) when
    that run is not a KILLED run of this config.
    """
    from mlflow.entities import RunTag
    from mlflow.exceptions import MlflowException

    try:
        old = client.get_run(run_id)
    except MlflowException:
        return None
    if old.info.status != "KILLED" or old.data.tags.get(CONFIG_HASH_TAG) != chash:
        return None
    # Owner tags and heartbeat first: a reconcile elsewhere that sees it RUNNING sees us.
    resumed = f"{datetime.now(UTC):%Y-%m-%dT%H:%M:%SZ} (claim {claim.run_id})"
    tags = [RunTag(k, v) for k, v in owner_tags().items()]
    client.log_batch(run_id, tags=[*tags, RunTag(f"{TAG}resumed", resumed)])
    if FAILURE_TAG in old.data.tags:
        client.delete_tag(run_id, FAILURE_TAG)
    heartbeats.add(client, run_id)
    client.update_run(run_id, status="RUNNING")
    heartbeats.discard(claim.run_id)
    client.set_terminated(claim.run_id, status="KILLED")
    client.delete_run(claim.run_id)  # the claim was only a placeholder: no stray run stays
    logged = [m.step for m in client.get_metric_history(run_id, monitor)]
    return RunTracker(client, run_id), max(logged, default=-1)


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

    @property
    def pending(self) -> bool:
        """Whether this run's record waits for ``fitscope runs sync``."""
        return self.record is not None and self.offline

    @classmethod
    def create(
        cls, client, experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]
    ) -> RunTracker:
        from mlflow.entities import Param

        run = client.create_run(experiment_id, run_name=run_name, tags={**tags, **owner_tags()})
        tracker = cls(client, run.info.run_id)
        heartbeats.add(client, tracker.run_id)
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

    def go_offline(self, reason: str) -> None:
        """Stop talking to the server; the record keeps the rest of the run."""
        assert self.record is not None
        self.offline = True
        if self.run_id:
            heartbeats.discard(self.run_id)
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
        self._log_metrics(_summary_metrics(summary, step, model_id))

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
            mlflow.set_tracking_uri(self.client.tracking_uri)
            mlflow.set_registry_uri(self.client.tracking_uri)
            # Logging the model is the run's last step: leaving this block ends the run
            # (FINISHED, or FAILED if logging raised).
            with mlflow.start_run(run_id=self.run_id):
                # pip_requirements given explicitly: inferring them costs ~8 s per model.
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    signature=infer_signature(example, output),
                    input_example=example,
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                    registered_model_name=registered_name,
                    step=step,
                )

        if not self._send("logging the model", upload):
            state = {"state_dict": model.mlp.state_dict(), "task": model.task}
            self.record.save_model(state, example, step, registered_name)
        return info

    def _close(self, status: str) -> None:
        heartbeats.discard(self.run_id)
        if self.record is not None:
            self.record.update(status=status, end_time=int(time.time() * 1000))
        self._send(
            "closing the run", lambda: self.client.set_terminated(self.run_id, status=status)
        )
        if self.record is not None and not self.offline:
            self.record.delete()  # everything reached the server
        self.closed = True

    def finish(self) -> None:
        self._close("FINISHED")

    def fail(self, reason: str, status: str = "FAILED") -> None:
        """End the run as FAILED (or KILLED) with the reason in the ``fitscope.failure`` tag."""
        if self.closed:
            return
        self.set_tags({FAILURE_TAG: reason[:8000]})
        self._close(status)


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (at most 300 characters), for one-line messages."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


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


FINISHED_FILTER = " and attributes.status = 'FINISHED'"
OFFLINE_TAG = f"{TAG}offline"  # why a run trained without a claim (docs/reliability.md)
OFFLINE_NOTE = "trained without a claim: the tracking server was unreachable when it started"
SYNC_ID_TAG = f"{TAG}sync_id"  # the pending record a run was uploaded from (stable)
DUPLICATE_TAG = f"{TAG}duplicate_of"  # an offline run of a config that another run finished


@dataclass(frozen=True)
class Synced:
    """What :func:`sync_pending` did with one record."""

    sync_id: str
    run_id: str | None
    note: str
    done: bool


def sync_pending(client, spool: Path | None = None) -> list[Synced]:
    """Upload every pending record in ``spool`` to ``client``'s server; idempotent.

    Each record's run is found by its run id or its ``fitscope.sync_id`` tag before one is
    created; only params, metric points (by key and step), dataset inputs and the model
    that the server lacks are sent; artifacts are uploaded again (same paths); the run gets
    the record's final status (a record whose process died while RUNNING ends KILLED).
    The record is deleted last, so a sync cut short is simply run again. Records still
    written by a live process, or made for another server, are left alone. The parents
    of synced runs are closed again (best child, counts) unless a live sweep holds them.
    """
    spool = spool or spool_dir()
    results, parents = [], set()
    for record in PendingRecord.all(spool):
        with record.lock() as held:
            data = record.data
            skip = None
            if not held:
                skip = "another sync holds it"
            elif data["status"] == "RUNNING" and record.owner_alive():
                skip = f"still written by its run ({Owner.parse(data['owner'])})"
            elif data["tracking_uri"] != client.tracking_uri:
                skip = f"made for {data['tracking_uri']}: set MLFLOW_TRACKING_URI to it to sync"
            if skip is not None:
                results.append(Synced(record.sync_id, data["run_id"], skip, False))
                continue
            run_id, parent, note = _sync_record(client, record)
            if parent:
                parents.add(parent)
            record.delete()
            results.append(Synced(record.sync_id, run_id, note, True))
    for parent in sorted(parents):
        run = client.get_run(parent)
        stale = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
        mine = run_owner(run) == Owner.current()
        if run.info.status != "RUNNING" or mine or dead_reason(run, stale) is not None:
            close_parent(client, parent)
    return results


def _find_run(client, experiment_id: str, run_id: str | None, sync_id: str):
    from mlflow.exceptions import MlflowException

    if run_id:
        with contextlib.suppress(MlflowException):
            return client.get_run(run_id)
    runs = client.search_runs([experiment_id], filter_string=tag_equals(SYNC_ID_TAG, sync_id))
    return runs[0] if runs else None


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _sync_record(client, record: PendingRecord) -> tuple[str, str | None, str]:
    """Make the server hold ``record``'s run; returns (run id, parent id, what was sent)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag

    data = record.data
    exp_id = ensure_experiment(client, data["experiment"], data.get("experiment_description"))
    parent = data.get("parent_run_id")
    if not parent and data.get("parent_key"):
        parent = find_or_create_parent(
            client, exp_id, data["parent_key"], data["parent_name"], data.get("parent_tags")
        )
    tags = {**data["tags"], SYNC_ID_TAG: record.sync_id}
    if parent:
        tags[PARENT_TAG] = parent
    run = _find_run(client, exp_id, data["run_id"], record.sync_id)
    if run is None:
        run = client.create_run(
            exp_id, start_time=data["start_time"], tags=tags, run_name=data["run_name"]
        )
    run_id = run.info.run_id
    record.update(run_id=run_id)  # a sync cut short finds this run again by id
    if data.get("claimed") is False:  # trained offline: another run may have the config
        chash = tags.get(CONFIG_HASH_TAG, "")
        others = client.search_runs(
            [exp_id],
            filter_string=tag_equals(CONFIG_HASH_TAG, chash) + FINISHED_FILTER,
        )
        first = min(
            (r for r in others if r.info.run_id != run_id),
            key=lambda r: r.info.start_time,
            default=None,
        )
        if first is not None:
            tags[DUPLICATE_TAG] = first.info.run_id
    params = [Param(k, v) for k, v in sorted(data["params"].items()) if k not in run.data.params]
    for chunk in _chunks(params, 100):
        client.log_batch(run_id, params=chunk)
    for chunk in _chunks([RunTag(k, v) for k, v in tags.items()], 100):
        client.log_batch(run_id, tags=chunk)
    by_key: dict[str, list] = {}
    for key, value, stamp, step in record.metrics():
        by_key.setdefault(key, []).append(Metric(key, value, stamp, step))
    sent = 0
    for key, points in by_key.items():
        have = {m.step for m in client.get_metric_history(run_id, key)}
        new = {m.step: m for m in points if m.step not in have}  # one point per step
        if new:
            client.log_batch(run_id, metrics=list(new.values()))
            sent += len(new)
    digests = {d.dataset.digest for d in run.inputs.dataset_inputs} if run.inputs else set()
    for ds in data["datasets"]:
        if ds["digest"][:36] not in digests:
            dataset = Dataset(
                name=ds["name"],
                digest=ds["digest"][:36],
                source_type="local",
                source=json.dumps({"uri": ds["source"]}),
                profile=json.dumps(ds["profile"]),
            )
            tag = InputTag("mlflow.data.context", ds["context"])
            client.log_inputs(run_id, datasets=[DatasetInput(dataset, [tag])])
    for name, artifact_path in data["artifacts"]:
        src = record.path / "files" / name
        if src.is_dir():
            client.log_artifacts(run_id, str(src), artifact_path)
        else:
            client.log_artifact(run_id, str(src), artifact_path)
    model = "no model"
    if data.get("model"):
        model = "model already there"
        if not _has_model(client, exp_id, run_id):
            _log_pending_model(client, run_id, record)
            model = "model logged"
    status = data["status"]
    if status == "RUNNING":  # its process died before it closed the record
        status = "KILLED"
        reason = "its process ended before the run was closed (uploaded by fitscope runs sync)"
        client.set_tag(run_id, FAILURE_TAG, reason)
        data["tags"][FAILURE_TAG] = reason
    current = client.get_run(run_id)
    stale = env_seconds(STALE_AFTER_ENV, STALE_AFTER_S)
    if (
        current.info.status == "RUNNING"
        and run_owner(current)
        not in (
            None,
            Owner.parse(data["owner"]),
        )
        and dead_reason(current, stale) is None
    ):
        status = "RUNNING"  # another live process took the run over: it closes it
    else:
        for stale_tag in (FAILURE_TAG, RECONCILED_TAG):
            if stale_tag in current.data.tags and stale_tag not in data["tags"]:
                client.delete_tag(run_id, stale_tag)  # a reconcile while the server was cut off
        client.set_terminated(run_id, status=status, end_time=data["end_time"])
    files = len(data["artifacts"])
    note = f"{len(params)} param(s), {sent} metric point(s), {files} file(s), {model}, {status}"
    if DUPLICATE_TAG in tags:
        note += f"; config already finished in run {tags[DUPLICATE_TAG]} (tagged {DUPLICATE_TAG})"
    return run_id, parent, note


def _has_model(client, experiment_id: str, run_id: str) -> bool:
    models = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )
    return any(str(m.status).endswith("READY") for m in models)


def _log_pending_model(client, run_id: str, record: PendingRecord) -> None:
    """Rebuild the record's model from its config and weights and log it to the run."""
    import numpy as np
    import torch

    from fitscope.models import ProbabilityModel, build_mlp_from_config

    folder = record.path / "model"
    state = torch.load(folder / "model.pt", weights_only=True)
    example = np.load(folder / "example.npy")
    mlp = build_mlp_from_config(record.data["config"], example.shape[1], init="torch_default")
    mlp.load_state_dict(state["state_dict"])
    spec = record.data["model"]
    RunTracker(client, run_id).log_model(
        ProbabilityModel(mlp, state["task"]), example, spec["step"], spec["registered_name"]
    )
