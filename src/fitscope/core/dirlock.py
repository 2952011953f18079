"""A directory held by one live process: two sweeps given the same ``hydra.sweep.dir``
would mix their jobs' files, so the second is refused with one line naming the first.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from pathlib import Path

from fitscope.core.errors import FitscopeError
from fitscope.core.process import Owner

HOLD_FILE = ".fitscope-holder"  # the holding process, as an Owner token


def hold_dir(directory: str | os.PathLike[str], what: str) -> Path:
    """Hold ``directory`` (config key ``what``) for this process until it exits, or until
    :func:`release_dir`; a hold left by a process that is gone is taken over.

    Raises a one-line error when a live process holds it (or one on another host, whose
    liveness cannot be told from here). Returns the hold file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hold, me = directory / HOLD_FILE, Owner.current()
    for _ in range(3):  # a dead holder's file is removed, then created again as ours
        try:
            fd = os.open(hold, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(hold)
            if holder == me:
                return hold
            if holder is not None and holder.alive() is not False:
                raise FitscopeError(
                    f"{what}={directory} is in use by the sweep in {holder}. Fix: wait for "
                    f"it to end, or set another {what}"
                ) from None
            hold.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(me.token())
        atexit.register(release_dir, hold)
        return hold
    raise FitscopeError(f"could not hold {what}={directory}. Fix: run the command again")


def release_dir(hold: Path) -> None:
    """Give up a hold this process has (a no-op for another's, or none)."""
    if _holder(hold) == Owner.current():
        with contextlib.suppress(FileNotFoundError):
            hold.unlink()


def _holder(hold: Path) -> Owner | None:
    try:
        return Owner.parse(hold.read_text())
    except (FileNotFoundError, UnicodeDecodeError):
        return None
