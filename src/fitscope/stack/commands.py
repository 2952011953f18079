"""``fitscope stack up|down|status`` (docs/team.md)."""

from __future__ import annotations

import argparse
from pathlib import Path

from fitscope.core.errors import FitscopeError
from fitscope.core.extras import EXTRA_MODULES, require
from fitscope.stack.control import (
    configure_dvc_remote,
    stack_status,
    start_stack,
    stop_stack,
    usage,
    write_env_file,
)
from fitscope.stack.info import DEFAULT_PORTS, DVC_REMOTE, DVC_URI


def cmd_stack(args: argparse.Namespace) -> None:

    state = Path(args.state_dir)
    if args.stack_command == "down":
        stopped = stop_stack(state)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'} (data kept in {state})")
        return
    if args.stack_command == "status":
        for name, pid in stack_status(state).items():
            print(f"{name:9}{'running, pid ' + str(pid) if pid else 'stopped'}")
        return
    ports = {}
    for item in args.port:
        name, _, value = item.partition("=")
        if name not in DEFAULT_PORTS or not value.isdigit():
            raise FitscopeError(
                f"--port {item!r} is not NAME=NUMBER. Fix: NAME is one of "
                f"{', '.join(DEFAULT_PORTS)}"
            )
        ports[name] = int(value)
    for component in args.components:  # before anything starts
        if component in EXTRA_MODULES["team"]:
            require("team", component, f"the team stack's {component}")
    info = start_stack(state, ports, args.components)
    env_file = write_env_file(info, args.env_file)
    if "s3" in info.pids and not args.no_dvc_remote:
        configure_dvc_remote(info)
        print(f"DVC remote '{DVC_REMOTE}' -> {DVC_URI} (credentials in .dvc/config.local)")
    print(usage(info, env_file))
