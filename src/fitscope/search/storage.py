"""Where a search's Optuna study lives: a journal file beside the search's outputs by
default, the team stack's PostgreSQL when it is up, any database URL, or memory."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError

AUTO = "auto"
# Set by the team stack's stack.env (fitscope.stack.info): its PostgreSQL's `optuna` database.
STACK_STORAGE_ENV = "FITSCOPE_OPTUNA_STORAGE"
JOURNAL_NAME = "optuna.journal"
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "oracle", "mssql")
# On a search's MLflow parent run: its study, and where it is stored (no password).
STUDY_TAG = "optuna.study_name"
STORAGE_TAG = "optuna.storage"


def resolve_storage(spec: str | None, sweep_dir: str | os.PathLike[str]) -> str | None:
    """The study's storage for ``hydra.sweeper.storage``: None (memory), a database URL,
    or an absolute journal-file path.

    ``auto``: the team stack's database when its environment names one, else
    ``optuna.journal`` in the sweep directory's parent (``multirun/<study>/``), which every
    run of the same search shares: a re-run continues the study, two at once share it.
    """
    if spec is None or str(spec).lower() in ("", "none", "null", "memory"):
        return None
    spec = str(spec)
    if spec == AUTO:
        stack = os.environ.get(STACK_STORAGE_ENV)
        if stack:
            return stack
        return str((Path(sweep_dir).absolute().parent / JOURNAL_NAME).resolve())
    if is_database_url(spec):
        return spec
    return str(Path(spec).expanduser().absolute())


def is_database_url(spec: str) -> bool:
    scheme = spec.split("://", 1)[0] if "://" in spec else ""
    return scheme.split("+", 1)[0] in DATABASE_SCHEMES


def open_storage(url: str | None) -> Any:
    """The Optuna storage object for a resolved storage (None: in memory)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    if url is None:
        return optuna.storages.InMemoryStorage()
    if is_database_url(url):
        return url  # Optuna builds (and caches) its RDBStorage from the URL
    path = Path(url)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    except OSError as exc:
        raise FitscopeError(
            f"hydra.sweeper.storage={url}: cannot write the study's journal there "
            f"({exc.strerror or exc}). Fix: set hydra.sweeper.storage to a writable file path"
        ) from None


def describe(url: str | None) -> str:
    """The storage as a log line shows it: a database URL without its password."""
    if url is None:
        return "memory (not kept after the search)"
    if is_database_url(url) and "@" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def reachable_url(described: str) -> str | None:
    """The storage that ``described`` (as :func:`describe` wrote it) names, from here: a
    database whose password was masked is the one ``FITSCOPE_OPTUNA_STORAGE`` names (the
    team stack's stack.env), or unreachable (None); memory is never reachable."""
    if described.startswith("memory"):
        return None
    if "***" in described:
        url = os.environ.get(STACK_STORAGE_ENV, "")
        return url if url and describe(url) == described else None
    return described


def load_recorded_study(study_name: str, described: str) -> Any | None:
    """The study a parent run names (its ``optuna.storage`` tag), or None when it is not
    reachable from here: kept in memory, its journal gone, or a database not configured."""
    import optuna

    url = reachable_url(described)
    if url is None or (not is_database_url(url) and not Path(url).is_file()):
        return None
    try:
        return optuna.load_study(study_name=study_name, storage=open_storage(url))
    except (KeyError, ValueError, OSError):
        return None
