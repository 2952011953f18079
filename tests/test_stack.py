"""The team stack (fitscope.stack): real PostgreSQL, SeaweedFS S3, MLflow server, Ray head."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from base64 import b64encode

import pytest

from fitscope import stack

pytestmark = pytest.mark.slow


def _search_experiments(info: stack.StackInfo, password: str | None) -> int:
    """HTTP status of a REST call, with the admin's credentials or none."""
    req = urllib.request.Request(
        f"{info.tracking_uri}/api/2.0/mlflow/experiments/search?max_results=1"
    )
    if password is not None:
        token = b64encode(f"{stack.ADMIN_USER}:{password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_server_refuses_anonymous_and_accepts_the_admin(team_stack):
    assert _search_experiments(team_stack, None) == 401
    assert _search_experiments(team_stack, "wrong-password") == 401
    assert _search_experiments(team_stack, team_stack.credentials["admin_password"]) == 200


def test_s3_refuses_unknown_keys(team_stack):
    import boto3
    from botocore.exceptions import ClientError

    stranger = boto3.client(
        "s3",
        endpoint_url=team_stack.s3_endpoint,
        aws_access_key_id="nobody",
        aws_secret_access_key="nothing",
        region_name="us-east-1",
    )
    with pytest.raises(ClientError):
        stranger.list_objects_v2(Bucket=stack.BUCKET)
    assert team_stack.s3_client().head_bucket(Bucket=stack.BUCKET)


def test_env_file_is_private_and_sources(team_stack, tmp_path):
    env_file = stack.write_env_file(team_stack, tmp_path / "stack.env")
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    shown = subprocess.run(
        ["bash", "-c", f"source {env_file} && env"], capture_output=True, text=True, check=True
    ).stdout
    env = dict(line.split("=", 1) for line in shown.splitlines() if "=" in line)
    assert env["MLFLOW_TRACKING_URI"] == team_stack.tracking_uri
    assert env["MLFLOW_TRACKING_PASSWORD"] == team_stack.credentials["admin_password"]
    assert env[stack.RAY_ADDRESS_ENV] == team_stack.ray_address


def test_every_listening_socket_is_loopback(team_stack):
    import psutil

    pids = set()
    for pid in team_stack.pids.values():
        proc = psutil.Process(pid)
        pids |= {proc.pid, *(c.pid for c in proc.children(recursive=True))}
    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids]
    assert {team_stack.ports[k] for k in ("postgres", "s3", "mlflow", "ray")} <= {
        c.laddr.port for c in listening
    }
    assert all(c.laddr.ip in ("127.0.0.1", "::ffff:127.0.0.1") for c in listening), listening


def test_unknown_component_is_one_line_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fitscope.cli",
            "stack",
            "up",
            "--state-dir",
            str(tmp_path),
            "--components",
            "mlflow",
        ],
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "mlflow needs postgres, s3" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "state.json").exists()  # refused before anything started
