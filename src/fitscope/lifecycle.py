"""Who owns a process: host, pid and start time (so a reused pid is not mistaken for it).

``tracking.py`` records the owner on every MLflow run fitscope opens and reconciles runs
whose owner is gone. No MLflow here.
"""

from __future__ import annotations

import os
import signal
import socket
from dataclasses import dataclass

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Owner:
    """A process, identified so that a reused pid is not mistaken for it."""

    host: str
    pid: int
    started: float  # psutil create_time(): seconds since the epoch

    @classmethod
    def current(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), psutil.Process().create_time())

    @classmethod
    def parse(cls, token: str | None) -> Owner | None:
        """The owner in ``host:pid:started`` (None for a missing or malformed token)."""
        try:
            host, pid, started = (token or "").rsplit(":", 2)
            return cls(host, int(pid), float(started))
        except ValueError:
            return None

    def token(self) -> str:
        return f"{self.host}:{self.pid}:{self.started!r}"

    def on_this_host(self) -> bool:
        return self.host == socket.gethostname()

    def alive(self) -> bool | None:
        """Whether the process still runs (None when it is on another host: cannot tell)."""
        if not self.on_this_host():
            return None
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) > 0.05:
                return False  # the pid was reused by another process
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
        except psutil.AccessDenied:
            return True

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}"


def block_signals_in_this_thread() -> None:
    """For helper threads: SIGINT/SIGTERM go to the main thread (which runs the handler)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
