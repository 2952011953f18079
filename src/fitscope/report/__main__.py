"""``python -m fitscope.report``: the ``fitscope report`` command (writes, then prints)."""

import sys

from fitscope.cli import main

main(["report", *sys.argv[1:]])
