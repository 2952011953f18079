"""The local team stack: PostgreSQL, an S3 store, an MLflow server and a Ray head.

``start_stack`` starts the components as subprocesses on 127.0.0.1 only, each with a PID
file and a log under a state directory (default ``.stack/``), waits until each answers,
and returns a :class:`StackInfo` (URIs, credentials, PIDs). ``stop_stack`` stops them by
the PIDs it recorded (never by process name). Credentials and ports are generated once
and kept in the state directory, so ``stop_stack`` then ``start_stack`` gives the same
URIs and passwords, and the data (PostgreSQL, SeaweedFS, the users database) survives.
See docs/team.md.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shlex
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.stack.components import (
    ray_temp_dir,
    start_mlflow,
    start_postgres,
    start_ray,
    start_s3,
)
from fitscope.stack.info import (
    ADMIN_USER,
    ARTIFACTS_URI,
    BUCKET,
    COMPONENTS,
    DEFAULT_ENV_FILE,
    DEFAULT_PORTS,
    DEFAULT_STATE_DIR,
    DVC_REMOTE,
    DVC_URI,
    StackInfo,
)
from fitscope.stack.processes import pid_file, recorded_process, venv_bin, write_private


def _load_state(state_dir: Path, ports: dict[str, int] | None) -> tuple[dict, dict]:
    """(ports, credentials): generated on first start, then reused from state.json."""
    path = state_dir / "state.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    creds = saved.get("credentials") or {
        "admin_password": secrets.token_urlsafe(18),
        "postgres_password": secrets.token_urlsafe(18),
        "flask_secret_key": secrets.token_hex(32),
        "s3_access_key": "fitscope" + secrets.token_hex(6),
        "s3_secret_key": secrets.token_urlsafe(24),
        "ray_token": secrets.token_hex(32),
    }
    # Ray's cluster token (stacks saved before it existed get one now).
    creds.setdefault("ray_token", secrets.token_hex(32))
    merged = {**DEFAULT_PORTS, **saved.get("ports", {}), **(ports or {})}
    write_private(path, json.dumps({"ports": merged, "credentials": creds}, indent=2))
    return merged, creds


STARTERS: dict[str, Callable[[StackInfo], Any]] = {
    "postgres": start_postgres,
    "s3": start_s3,
    "mlflow": start_mlflow,
    "ray": start_ray,
}
NEEDS = {"mlflow": ("postgres", "s3")}


def _check_components(components: Iterable[str]) -> tuple[str, ...]:
    chosen = tuple(components)
    unknown = [c for c in chosen if c not in COMPONENTS]
    if unknown:
        raise FitscopeError(
            f"unknown stack component(s) {', '.join(unknown)}. Fix: choose from "
            f"{', '.join(COMPONENTS)}"
        )
    for comp, needs in NEEDS.items():
        missing = [n for n in needs if comp in chosen and n not in chosen]
        if missing:
            raise FitscopeError(
                f"stack component {comp} needs {', '.join(missing)}. Fix: add it to the list"
            )
    return tuple(c for c in COMPONENTS if c in chosen)  # start order


def start_stack(
    state_dir: str | Path = DEFAULT_STATE_DIR,
    ports: dict[str, int] | None = None,
    components: Iterable[str] = COMPONENTS,
) -> StackInfo:
    """Start the components not already running; return where the stack answers.

    ``ports`` overrides :data:`DEFAULT_PORTS` (and is remembered for the next start). A
    component that fails to start (or to answer in time) stops itself and the ones this
    call started, then raises.
    """
    chosen = _check_components(components)
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)  # secrets in it are files of mode 600
    all_ports, creds = _load_state(state_dir, ports)
    info = StackInfo(state_dir, all_ports, creds)
    started: list[str] = []
    try:
        for name in chosen:
            proc = recorded_process(state_dir, name)
            if proc is None:
                started.append(name)  # first: one that hangs unready is stopped too
                proc = STARTERS[name](info)
            info.pids[name] = proc.pid
    except BaseException:
        for name in reversed(started):
            _stop_component(state_dir, name)
        raise
    return info


# Seconds to wait after the stop signal before SIGKILL. SeaweedFS's volume server is down
# (its data flushed) in a second, but its filer then waits ~17 s on the S3 gateway's stream;
# `ray start --block` never exits on SIGTERM; on SIGINT it stops its children and itself
# within about a second.
STOP_GRACE_S = {"postgres": 30.0, "s3": 8.0, "mlflow": 15.0, "ray": 5.0}


def _stop_component(state_dir: Path, name: str) -> bool:
    """Stop one component and everything it started; True if it was running."""
    import psutil

    proc = recorded_process(state_dir, name)
    pid_file(state_dir, name).unlink(missing_ok=True)
    if proc is None:
        return False
    group = [proc, *proc.children(recursive=True)]
    if name == "postgres":
        proc.send_signal(signal.SIGINT)  # "fast" shutdown; SIGTERM waits for clients
    elif name == "ray":
        proc.send_signal(signal.SIGINT)  # `ray start --block` stops the head's processes
    else:
        for p in group:  # Ray and MLflow workers, the weed servers
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
    _, alive = psutil.wait_procs(group, timeout=STOP_GRACE_S[name])
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    if name == "ray":  # session files only (Ray keeps no data between starts)
        shutil.rmtree(ray_temp_dir(state_dir), ignore_errors=True)
    return True


def stop_stack(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[str]:
    """Stop every component recorded in ``state_dir`` (dependents first); the names stopped."""
    state_dir = Path(state_dir).resolve()
    return [n for n in reversed(COMPONENTS) if _stop_component(state_dir, n)]


def stack_status(state_dir: str | Path = DEFAULT_STATE_DIR) -> dict[str, int | None]:
    """Each component's PID, or None when it is not running."""
    state_dir = Path(state_dir).resolve()
    procs = {n: recorded_process(state_dir, n) for n in COMPONENTS}
    return {n: (p.pid if p is not None else None) for n, p in procs.items()}


def write_env_file(info: StackInfo, path: str | Path = DEFAULT_ENV_FILE) -> Path:
    """Write the client settings as ``export`` lines to ``path`` (mode 600)."""
    path = Path(path)
    lines = [
        "# fitscope team stack (written by `fitscope stack up`; secrets: keep it private)",
        *(f"export {k}={shlex.quote(v)}" for k, v in info.client_env().items()),
    ]
    write_private(path, "\n".join(lines) + "\n")
    return path


def configure_dvc_remote(info: StackInfo, repo: str | Path = ".") -> None:
    """Make the stack's S3 store the default DVC remote of ``repo``, in .dvc/config.local.

    Everything goes to the local (git-ignored) config, so the committed .dvc/config names
    no remote: a clone without a stack still runs `dvc repro`.
    """
    dvc = [venv_bin("dvc"), "remote"]
    for args in (
        ["add", "--local", "--force", "--default", DVC_REMOTE, DVC_URI],
        ["modify", "--local", DVC_REMOTE, "endpointurl", info.s3_endpoint],
        ["modify", "--local", DVC_REMOTE, "access_key_id", info.credentials["s3_access_key"]],
        ["modify", "--local", DVC_REMOTE, "secret_access_key", info.credentials["s3_secret_key"]],
    ):
        proc = subprocess.run([*dvc, *args], cwd=repo, capture_output=True, text=True)
        local = Path(repo) / ".dvc" / "config.local"
        if local.exists():  # it holds the S3 secret
            local.chmod(0o600)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["?"])[-1]
            raise FitscopeError(
                f"dvc remote {args[0]} failed ({reason}). Fix: run it in a DVC "
                "repository (the fitscope checkout)"
            )


def usage(info: StackInfo, env_file: Path) -> str:
    """What `fitscope stack up` prints: where everything is and how to use it."""
    return "\n".join(
        [
            f"MLflow   {info.tracking_uri}  (user {ADMIN_USER}, password in {env_file})",
            f"S3       {info.s3_endpoint}  bucket {BUCKET}: artifacts {ARTIFACTS_URI}, "
            f"DVC remote {DVC_URI}",
            f"Ray      {info.ray_address}" if "ray" in info.pids else "Ray      not started",
            f"state    {info.state_dir} (logs: *.log)",
            f"use it:  source {env_file}   then dvc repro / fitscope-train as usual",
            "stop it: make stack-down",
        ]
    )
