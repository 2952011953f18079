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
    # The token is written first and linked into place: the hold file never exists empty.
    mine = directory / f"{HOLD_FILE}.{os.getpid()}"
    mine.write_text(me.token())
    try:
        for _ in range(3):  # a dead holder's file is removed, then linked again as ours
            try:
                os.link(mine, hold)
            except FileExistsError:
                token = _token(hold)
                holder = Owner.parse(token)
                if holder == me:
                    return hold
                if holder is not None and holder.alive() is not False:
                    raise FitscopeError(
                        f"{what}={directory} is in use by the sweep in {holder}. Fix: wait "
                        f"for it to end, or set another {what}"
                    ) from None
                if _token(hold) == token:  # still the dead one (not just taken by another)
                    hold.unlink(missing_ok=True)
                continue
            atexit.register(release_dir, hold)
            return hold
    finally:
        mine.unlink(missing_ok=True)
    raise FitscopeError(f"could not hold {what}={directory}. Fix: run the command again")


def release_dir(hold: Path) -> None:
    """Give up a hold this process has (a no-op for another's, or none)."""
    if _holder(hold) == Owner.current():
        with contextlib.suppress(FileNotFoundError):
            hold.unlink()


def _token(hold: Path) -> str | None:
    try:
        return hold.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def _holder(hold: Path) -> Owner | None:
    return Owner.parse(_token(hold))
