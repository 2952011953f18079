"""Processes of the team stack: free ports, PID files with the process start time (a
reused PID is not ours), logs, and waiting until a component answers.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from fitscope.core.errors import FitscopeError
from fitscope.core.process import Owner
from fitscope.stack.info import DEFAULT_PORTS, HOST, INSTALL_HINT


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

    chosen: dict[str, int] = {}
    rng = random.SystemRandom()
    while len(chosen) < len(DEFAULT_PORTS):
        port = rng.randrange(41000, 45535)
        taken = {*chosen.values(), *(p + 10000 for p in chosen.values())}
        if {port, port + 10000} & taken or not (_port_free(port) and _port_free(port + 10000)):
            continue
        chosen[list(DEFAULT_PORTS)[len(chosen)]] = port
    return chosen


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by the owner only (it holds secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.chmod(path, 0o600)


def pid_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.pid"


def log_file(state_dir: Path, name: str) -> Path:
    return state_dir / f"{name}.log"


def _record_pid(state_dir: Path, name: str, pid: int) -> None:
    owner = Owner.of(pid)
    pid_file(state_dir, name).write_text(json.dumps({"pid": pid, "started": owner.started}))


def recorded_process(state_dir: Path, name: str):
    """The live process a PID file names, or None (a reused PID is not ours)."""
    path = pid_file(state_dir, name)
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
        return Owner(socket.gethostname(), rec["pid"], rec["started"]).process()
    except (ValueError, KeyError, psutil.Error):
        return None


def wait_until_ready(
    name: str, state_dir: Path, proc, ready: Callable[[], bool], timeout_s: float
) -> None:
    """Poll ``ready`` until it is true; a dead process or a timeout is a one-line error."""
    deadline = time.monotonic() + timeout_s
    log = log_file(state_dir, name)
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


def tcp_open(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def spawn(state_dir: Path, name: str, cmd: list[str], env: dict[str, str] | None = None, **kwargs):
    """Start ``cmd`` in its own session, output to its log, PID recorded."""
    log = log_file(state_dir, name)
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


def venv_bin(name: str) -> str:
    """A console script of this venv (next to the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FitscopeError(f"`{name}` not found. {INSTALL_HINT}")
    return found
