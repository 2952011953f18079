"""``fitscope runs reconcile`` and ``fitscope runs sync``: MLflow run housekeeping."""

from __future__ import annotations

import argparse
from pathlib import Path

from fitscope.core.errors import FitscopeError
from fitscope.model.mlp import model_from_weights
from fitscope.tracking.liveness import reconcile_store
from fitscope.tracking.offline import spool_dir
from fitscope.tracking.store import existing_client
from fitscope.tracking.sync import sync_pending


def cmd_runs_reconcile(args: argparse.Namespace) -> None:
    if args.stale_after is not None and not args.stale_after > 0:
        raise FitscopeError(
            f"--stale-after {args.stale_after:g} must be a positive number of seconds. "
            "Fix: e.g. --stale-after 600"
        )
    client = existing_client()
    changed, running, names = reconcile_store(client, args.experiment, args.stale_after)
    for run in changed:
        print(f"KILLED {run.run_id} {names[run.experiment_id]}/{run.run_name}: {run.reason}")
    print(
        f"reconciled {len(names)} experiment(s): {len(changed)} run(s) KILLED, "
        f"{len(running)} still RUNNING"
    )


def cmd_runs_sync(args: argparse.Namespace) -> None:

    spool = Path(args.dir) if args.dir else spool_dir()
    client = existing_client()
    results = sync_pending(client, spool, build_model=model_from_weights)
    for r in results:
        print(f"{'synced' if r.done else 'left'} {r.sync_id} -> run {r.run_id or '-'}: {r.note}")
    synced = sum(r.done for r in results)
    print(
        f"synced {synced} record(s) from {spool} to {client.tracking_uri}; "
        f"{len(results) - synced} left pending"
    )
