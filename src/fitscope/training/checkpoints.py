"""Reading a resume checkpoint safely: one that cannot be read is set aside, not fatal.

A ``kill -9`` cannot leave a half-written ``last.ckpt`` (it is written beside and renamed,
callbacks.PeriodicCheckpoint), but a full disk, a copy, or another program can. Such a
file is moved out of the way with one warning line and the run trains from scratch
(docs/reliability.md).
"""

from __future__ import annotations

import logging
import pickle
import time
import zipfile
from pathlib import Path

from fitscope.core.errors import first_line

log = logging.getLogger(__name__)


def unreadable_reason(path: Path) -> str | None:
    """Why the Lightning checkpoint at ``path`` cannot be resumed from (None: it can).

    Loaded as the resume will load it: ``weights_only=True``, so nothing in it runs.
    """
    import torch

    if path.stat().st_size == 0:
        return "it is empty (0 bytes)"
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; this one is cut or not one
        return "it is not a readable checkpoint (truncated, or not a torch.save archive)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if isinstance(exc, pickle.UnpicklingError):
            # torch's text advises weights_only=False, which would run what the file holds.
            return "it holds more than tensors and plain values (refused, never unpickled)"
        return f"it is not a readable checkpoint ({type(exc).__name__}: {first_line(exc)})"
    if not isinstance(state, dict) or not {"state_dict", "loops"} <= state.keys():
        return "it is not a Lightning checkpoint (no state_dict or loop state)"
    return None


def set_aside_if_unreadable(path: Path, aside: Path) -> bool:
    """True when the checkpoint at ``path`` can be resumed from; else it is moved to
    ``aside`` (for a look later), with one warning line naming the file and why."""
    reason = unreadable_reason(path)
    if reason is None:
        return True
    aside = aside.with_name(f"{aside.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}.ckpt")
    aside.parent.mkdir(parents=True, exist_ok=True)
    path.rename(aside)
    log.warning(
        "checkpoint %s cannot be resumed from: %s. Set aside as %s; training from scratch",
        path,
        reason,
        aside,
    )
    return False
