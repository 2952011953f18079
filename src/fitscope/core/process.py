"""Process identity: an :class:`Owner` (host, pid, start time) that a reused pid is not
mistaken for, and the signals a process's helper threads leave to its main thread.
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

    @classmethod
    def of(cls, pid: int) -> Owner:
        """The process ``pid`` on this host, as it is now."""
        return cls(socket.gethostname(), pid, psutil.Process(pid).create_time())

    def alive(self) -> bool | None:
        """Whether the process still runs (None when it is on another host: cannot tell)."""
        if not self.on_this_host():
            return None
        try:
            return self.process() is not None
        except psutil.AccessDenied:
            return True

    def process(self) -> psutil.Process | None:
        """This live process on this host, or None (gone, a zombie, or its pid reused by
        another process: start times differ by more than clock rounding)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) > 0.05:
                return None
            return proc if proc.status() != psutil.STATUS_ZOMBIE else None
        except psutil.NoSuchProcess:
            return None

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host}"


def block_signals_in_this_thread() -> None:
    """For helper threads: SIGINT/SIGTERM go to the main thread (which runs the handler)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
