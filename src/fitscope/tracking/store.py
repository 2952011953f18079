"""The tracking store: resolving its URI, opening a client with bounded retries, and telling
a server that is down from a wrong URI.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from fitscope.core.errors import FitscopeError, first_line

# Defaults; the environment variables override them (seconds).
HEARTBEAT_S = 30.0
HEARTBEAT_ENV = "FITSCOPE_HEARTBEAT_S"
STALE_AFTER_S = 600.0
STALE_AFTER_ENV = "FITSCOPE_STALE_AFTER_S"
CLAIM_SETTLE_S = 3.0
CLAIM_SETTLE_ENV = "FITSCOPE_CLAIM_SETTLE_S"


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


def sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Serialise store creation and experiment creation across processes (SQLite only).

    Concurrent first opens of a fresh SQLite file race on schema migrations and can
    corrupt it; concurrent ``create_experiment`` calls race on the unique name.
    """
    path = sqlite_path(uri)
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


MLFLOW_URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """Set environment variables for the block only (restored whatever happens)."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def global_store(uri: str) -> Iterator[None]:
    """Point MLflow's process-global tracking and registry URIs at ``uri`` for the block.

    Some client calls open a fresh ``MlflowClient()`` on the global URI instead of the
    client's own: the SQLAlchemy registry store resolves a ``models:/m-...`` source that
    way (``create_model_version``). Unset, that URI is ``sqlite:///mlflow.db`` in the
    current directory: in a queued DVC experiment, DVC's temporary copy, not the store
    that ``resolve_tracking_uri`` opened (the workspace's). MLflow's URIs and the
    environment variables it exports them to are restored afterwards.
    """
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri)
    with environment(**dict.fromkeys(MLFLOW_URI_VARS, uri)):  # what MLflow exports them to
        tracking_utils.set_tracking_uri(uri)
        registry_utils.set_registry_uri(uri)
        try:
            yield
        finally:
            tracking_utils.set_tracking_uri(saved[0])
            registry_utils._registry_uri = saved[1]


# MLflow's defaults retry an unreachable server for about 4 minutes before failing;
# these make a store problem a one-line error within seconds (a user's own values win).
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def _probe_sqlite_write(path: Path) -> None:
    """Write (the same header value) and roll back: a read-only file or folder fails here."""

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
    db = sqlite_path(uri)
    try:
        with store_lock(uri):
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


def existing_client(uri: str | None = None):
    """A client on a store that must already exist (a local SQLite file is not created)."""
    uri = uri or resolve_tracking_uri()
    path = sqlite_path(uri)
    if path is not None and not path.is_file():
        raise FitscopeError(
            f"no MLflow store at {path}. Fix: run from the directory that holds mlflow.db, "
            "or set MLFLOW_TRACKING_URI"
        )
    return get_client(uri)
