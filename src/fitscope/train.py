"""``python -m fitscope.train`` and ``fitscope-train``: the Hydra training entry.

The entry itself lives in :mod:`fitscope.pipeline.entry`; this module keeps the documented
command names.
"""

from fitscope.pipeline.entry import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
