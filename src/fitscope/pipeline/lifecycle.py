"""How a fitscope process starts and ends: its owner identity, SIGINT/SIGTERM, orphan watchdog.

Three roles, one per process kind:

* the **entry** (``fitscope-train`` / ``python -m fitscope.train``, :func:`run_entry`) exports
  its identity for the sweep's jobs, keeps SIGINT/SIGTERM away from the worker processes it
  spawns (they inherit a blocked signal mask) and forwards the signals to them itself, then
  turns an interrupt into one line and exit code 128 + signal number;
* a **job** (one training run, :class:`JobGuard`) takes the signals while it runs: SIGINT
  raises ``KeyboardInterrupt`` as usual (Lightning then stops the fit, calls the callbacks'
  ``on_exception`` and exits with ``SystemExit(1)``); SIGTERM inside Lightning's fit is left
  to Lightning (``SIGTERMException`` at the next batch), elsewhere it raises
  :class:`Interrupted`. The caller ends its run KILLED, whatever exception arrives;
* in a joblib/loky **worker**, a watchdog thread sends the job SIGTERM when the entry
  process is gone (even after ``kill -9``), and ends the idle worker.

Who owns a run is an :class:`Owner` (host, pid, process start time); ``tracking.py`` records
it on MLflow runs and reconciles runs whose owner is gone. No MLflow here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from typing import Any

import psutil

from fitscope.core.process import SIGNALS, Owner, block_signals_in_this_thread

log = logging.getLogger(__name__)

ENTRY_ENV = "FITSCOPE_ENTRY_OWNER"  # host:pid:start time of the process that started the sweep
WATCHDOG_S = 1.0  # how often a worker checks that its entry process is still there
GRACE_S = 30.0  # then how long an orphaned job may take to end its run before the worker exits
# What a re-run does (a DVC train stage included, with its inputs unchanged).
RESUME_HINT = (
    "run the same command again to resume (finished runs are kept, interrupted ones "
    "continue from their last checkpoint)"
)


class Interrupted(BaseException):
    """SIGINT or SIGTERM ended the work. Not an ``Exception``: nothing may swallow it."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class _State:
    """Per-process signal state (signals are a process-wide resource)."""

    received: int | None = None  # the first SIGINT/SIGTERM this process got
    entry = False  # this process runs run_entry
    job_active = False
    shielded = 0
    watchdog: threading.Thread | None = None


_state = _State()


def received() -> int | None:
    """The first SIGINT/SIGTERM this process received, if any."""
    return _state.received


def entry_owner() -> Owner | None:
    return Owner.parse(os.environ.get(ENTRY_ENV))


def in_worker() -> bool:
    """True in a sweep job that runs in another process than the entry (a loky worker)."""
    owner = entry_owner()
    return owner is not None and owner.pid != os.getpid()


def _lightning_has_sigterm() -> bool:
    # Inside Lightning's fit, its signal connector has replaced our SIGTERM handler with a
    # composite that sets `trainer.received_sigterm` and then calls ours.
    return signal.getsignal(signal.SIGTERM) is not _handle


def _handle(signum: int, frame: Any) -> None:
    if _state.received is not None:
        return  # a repeat: the first one's cleanup is under way, let it finish
    _state.received = signum
    if _state.job_active:
        if _state.shielded:
            return  # raised when the shielded store operation is done
        if signum == signal.SIGTERM and _lightning_has_sigterm():
            return  # Lightning raises SIGTERMException at the end of the current batch
        _raise(signum)
    if not _state.entry:
        return  # an idle worker: its next job refuses to start
    workers = _children()
    if not workers:
        _raise(signum)
    # Jobs run in worker processes: let them end their runs (KILLED) and return; the sweep
    # then ends and reports the interrupt. Ctrl-C reaches them already (same process group);
    # `kill <entry pid>` does not, so forward it. Workers ignore repeats.
    for proc in workers:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signum)


def _raise(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt  # what Python and Lightning users expect from Ctrl-C
    raise Interrupted(signum, f"interrupted ({signal_name(signum)}); {RESUME_HINT}")


def _children() -> list[psutil.Process]:
    """This process's live children, less the resource trackers (they ignore signals)."""
    found = []
    for proc in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and not any(
                "resource_tracker" in arg for arg in proc.cmdline()
            ):
                found.append(proc)
    return found


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


class JobGuard:
    """Signal handling around one job (one training run) in any process.

    A signal already received by this process (a worker whose sweep was interrupted while
    it was idle) stops the job before it starts.
    """

    def __init__(self) -> None:
        self._handlers: dict[int, Any] = {}
        self._mask: set[int] | None = None

    def __enter__(self) -> JobGuard:
        if _state.received is not None:
            if not (_state.entry or in_worker()):
                _state.received = None  # a plain process (a notebook): that interrupt is over
            else:
                name = signal_name(_state.received)
                raise Interrupted(_state.received, f"interrupted ({name}) before it started")
        _start_watchdog()
        if _main_thread():
            self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the current mask
            self._handlers = {s: signal.signal(s, _handle) for s in SIGNALS}
            _state.job_active = True
            try:
                # Delivers a signal that arrived while this worker was idle (it raises here).
                signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            except BaseException:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        _state.job_active = False
        if self._mask is not None:
            # Back to the entry's mask: an idle loky worker must not die of a Ctrl-C.
            signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        if in_worker():
            # Threads started during the job (torch, MLflow) can still take a signal, and
            # Python runs the handler in this thread: keep ours, which records it and lets
            # the next job refuse to start, rather than die between jobs.
            return
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """Defer a signal until a store operation (create run + claim) is complete."""
        _state.shielded += 1
        try:
            yield
        finally:
            _state.shielded -= 1
        if _state.received is not None and not _state.shielded:
            _raise(_state.received)

    def check(self) -> None:
        """Raise a signal that arrived while Lightning was in charge but never acted on."""
        if _state.received is not None and _state.job_active:
            _raise(_state.received)


def _start_watchdog() -> None:
    """In a worker of a sweep started on this host, stop when the entry process is gone."""
    owner = entry_owner()
    if _state.watchdog is not None or owner is None or owner.pid == os.getpid():
        return
    if owner.alive() is None:
        return  # another host (a cluster launcher): its own scheduler handles orphans
    thread = threading.Thread(target=_watch, args=(owner,), name="fitscope-watchdog", daemon=True)
    _state.watchdog = thread
    thread.start()


def _watch(owner: Owner) -> None:
    block_signals_in_this_thread()
    signalled_at = None
    while True:
        time.sleep(WATCHDOG_S)
        if owner.alive():
            continue
        if not _state.job_active or (
            signalled_at is not None and time.monotonic() - signalled_at > GRACE_S
        ):
            os._exit(128 + signal.SIGTERM)  # nobody to report to; nothing (more) to clean up
        if signalled_at is None:
            log.warning("the sweep's process (%s) is gone: stopping this job", owner)
            os.kill(os.getpid(), signal.SIGTERM)  # ends the run KILLED like any SIGTERM
            signalled_at = time.monotonic()


def run_entry(main: Callable[[], Any], finalize: Callable[[str], None]) -> None:
    """Run the entry ``main``; ``finalize(outcome)`` then closes what it left open.

    ``outcome`` is ``"ok"``, ``"failed"`` or ``"interrupted"``. An interrupt ends the process
    with one line on stderr and exit code 128 + signal number, never a traceback.
    """
    os.environ[ENTRY_ENV] = Owner.current().token()
    _state.entry = True
    if _main_thread():
        # Processes spawned from now on (loky workers) start with SIGINT/SIGTERM blocked:
        # an idle worker killed by Ctrl-C would make loky SIGKILL the busy ones mid-cleanup.
        # This thread, started before the block, is where the kernel delivers them; Python
        # runs the handler in the main thread.
        threading.Thread(
            target=threading.Event().wait, name="fitscope-signals", daemon=True
        ).start()
        # CPython's resource tracker unblocks both signals after it spawns (it is started on
        # the first multiprocessing lock, i.e. by loky): start it now, before the block.

        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        for signum in SIGNALS:
            signal.signal(signum, _handle)
    outcome, interrupt, pending = "ok", None, None
    try:
        main()
    except Interrupted as exc:
        outcome, interrupt = "interrupted", exc
    except SystemExit as exc:
        if exc.code not in (0, None):
            outcome, pending = "failed", exc
        if _state.received is not None and exc.code == 128 + _state.received:
            outcome = "reported"  # an interrupt already reported on one line (cli.run_cli)
    except BaseException as exc:
        outcome, pending = "failed", exc
    signum = _state.received
    if signum is not None and outcome == "failed":
        # Whatever broke after a signal (Lightning's SystemExit(1), a worker pool torn down
        # by a second Ctrl-C) is the interrupt.
        outcome, pending = "interrupted", None
        interrupt = Interrupted(signum, f"interrupted ({signal_name(signum)}); {RESUME_HINT}")
    try:
        finalize("interrupted" if outcome == "reported" else outcome)
    except Exception as exc:  # the outcome matters more than the bookkeeping
        log.warning("could not close the sweep's records: %s", exc)
    if interrupt is not None:
        print(f"fitscope: {interrupt.message}", file=sys.stderr)
        raise SystemExit(interrupt.exit_code)
    if pending is not None:
        raise pending
