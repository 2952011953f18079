"""Starting each component of the team stack: PostgreSQL (pgserver), SeaweedFS (S3), the
MLflow server with basic auth, and a Ray head.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import warnings
from pathlib import Path

from fitscope.core.errors import FitscopeError
from fitscope.stack.info import (
    ADMIN_USER,
    ARTIFACTS_URI,
    BUCKET,
    DATABASES,
    HOST,
    INSTALL_HINT,
    PG_SYSTEM_USER,
    StackInfo,
)
from fitscope.stack.processes import (
    http_status,
    log_file,
    spawn,
    tcp_open,
    venv_bin,
    wait_until_ready,
    write_private,
)


def start_postgres(info: StackInfo):
    bin_dir = _postgres_bin()
    pgdata = info.state_dir / "pgdata"
    user = None
    if os.geteuid() == 0:  # PostgreSQL refuses root: run it as pgserver's own system user
        from pgserver.utils import ensure_prefix_permissions, ensure_user_exists

        user = PG_SYSTEM_USER
        ensure_user_exists(user)
        ensure_prefix_permissions(bin_dir)
    if not (pgdata / "PG_VERSION").exists():
        shutil.rmtree(pgdata, ignore_errors=True)  # a half-initialised one from a crash
        pgdata.mkdir(mode=0o700)
    if user is not None:  # its user must reach pgdata (pgserver widens the parents' o+x)
        from pgserver.utils import ensure_prefix_permissions

        ent = pwd.getpwnam(user)
        ensure_prefix_permissions(pgdata)
        os.chown(pgdata, ent.pw_uid, ent.pw_gid)
    if not (pgdata / "PG_VERSION").exists():
        _initdb(info, bin_dir, pgdata, user)
    # TCP on loopback only; the Unix socket in pgdata (never /tmp, shared by other servers).
    cmd = [str(bin_dir / "postgres"), "-D", str(pgdata), "-h", HOST]
    cmd += ["-p", str(info.ports["postgres"]), "-k", str(pgdata)]
    proc = spawn(info.state_dir, "postgres", cmd, user=user)
    wait_until_ready("postgres", info.state_dir, proc, lambda: _postgres_ready(info), 60)
    return proc


def _postgres_bin() -> Path:
    """PostgreSQL's binaries, as the pgserver wheel ships them."""
    try:
        with warnings.catch_warnings():  # its import warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            from pgserver._commands import POSTGRES_BIN_PATH
    except ImportError:
        raise FitscopeError(f"the pgserver package is missing. {INSTALL_HINT}") from None
    return Path(POSTGRES_BIN_PATH)


def _initdb(info: StackInfo, bin_dir: Path, pgdata: Path, user: str | None) -> None:
    """A new cluster in ``pgdata`` whose superuser has the stack's password."""
    pwfile = info.state_dir / "pg.pw"
    write_private(pwfile, info.credentials["postgres_password"] + "\n")
    if user is not None:
        ent = pwd.getpwnam(user)
        os.chown(pwfile, ent.pw_uid, ent.pw_gid)
    initdb = [
        str(bin_dir / "initdb"),
        *("-D", str(pgdata), "-U", "postgres", f"--pwfile={pwfile}", "--encoding=utf8"),
        *("--auth-host=scram-sha-256", "--auth-local=peer"),
    ]
    try:
        subprocess.run(initdb, check=True, capture_output=True, text=True, user=user)
    except subprocess.CalledProcessError as exc:
        log = log_file(info.state_dir, "postgres")
        log.write_text(exc.stdout + exc.stderr)
        raise FitscopeError(f"initdb failed. Fix: see {log}") from None
    finally:
        pwfile.unlink()


def _postgres_ready(info: StackInfo) -> bool:
    """PostgreSQL answers, and its databases exist (created the first time)."""
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
            for database in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {database}")
    finally:
        con.close()
    return True


def start_s3(info: StackInfo):
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
    write_private(config, json.dumps({"identities": [identity]}))
    p = info.ports
    cmd = [
        venv_bin("weed"),
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
    proc = spawn(info.state_dir, "s3", cmd)

    def ready() -> bool:
        s3 = info.s3_client()
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if BUCKET not in names:
            s3.create_bucket(Bucket=BUCKET)
        s3.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")  # volumes are writable
        return True

    wait_until_ready("s3", info.state_dir, proc, ready, 90)
    return proc


def start_mlflow(info: StackInfo):
    auth_ini = info.state_dir / "basic_auth.ini"
    users_db = info.state_dir / "basic_auth.db"
    write_private(
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
        venv_bin("mlflow"),
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
    proc = spawn(info.state_dir, "mlflow", cmd, env=env, cwd=info.state_dir)
    url = f"{info.tracking_uri}/health"
    wait_until_ready("mlflow", info.state_dir, proc, lambda: http_status(url) == 200, 120)
    return proc


def ray_temp_dir(state_dir: Path) -> Path:
    """Ray's session dir: short (Unix socket paths must stay under 107 bytes)."""

    digest = hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/tmp") / f"fitscope-ray-{digest}"


def start_ray(info: StackInfo):
    p = info.ports
    cmd = [
        venv_bin("ray"),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={p['ray']}",
        f"--ray-client-server-port={p['ray_client']}",
        f"--dashboard-agent-listen-port={p['ray_agent']}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--temp-dir={ray_temp_dir(info.state_dir)}",
        f"--num-cpus={os.cpu_count() or 1}",
    ]
    write_private(info.ray_token_file, info.credentials["ray_token"])
    env = {
        # Without it Ray advertises the machine's network address, not loopback.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # `ray start` leaves token auth off unless told (a local `ray.init()` turns it on).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(info.ray_token_file),
    }
    proc = spawn(info.state_dir, "ray", cmd, env=env)
    wait_until_ready("ray", info.state_dir, proc, lambda: tcp_open(p["ray"]), 90)
    return proc
