"""Every `fitscope` subcommand: `--help` works, its handler imports, and one tiny real call
of each that no other test runs end to end (train, search, report and the stack have their
own files) succeeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, venv_env

from fitscope.cli import COMMANDS, build_parser, handler
from fitscope.tracking.store import get_client


def fitscope(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fitscope.cli", *args],
        cwd=cwd,
        env=venv_env(FITSCOPE_PROGRESS="0", **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("key", sorted(COMMANDS))
def test_every_subcommand_has_help_and_a_handler(key, tmp_path):
    assert callable(handler(key))  # its module imports, its function exists
    proc = fitscope([*key.split(), "--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: fitscope {key}")


def test_the_parser_and_the_handler_table_name_the_same_subcommands():
    parser = build_parser()
    keys = set()
    for action in parser._subparsers._group_actions[0].choices.items():
        name, sub = action
        nested = [a for a in sub._actions if a.__class__.__name__ == "_SubParsersAction"]
        keys |= {f"{name} {n}" for n in nested[0].choices} if nested else {name}
    assert keys == set(COMMANDS)


@pytest.mark.slow
def test_a_tiny_real_call_of_each_data_and_housekeeping_subcommand(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    get_client(uri)  # the store the housekeeping commands look at
    calls = [
        (["synth-higgs", "synthetic", "--rows", "300"], "wrote 300 synthetic rows"),
        (["mirror", "--checksums-only", "--dir", "synthetic", "--datasets", "higgs"], "file(s)"),
        (["fetch", "mnist"], "mnist"),
        (["split", "mnist"], "split mnist:"),
        (["stack", "status", "--state-dir", "stack-state"], "stopped"),
        (["runs", "reconcile"], "0 run(s) KILLED, 0 still RUNNING"),
        (["runs", "sync", "--dir", "nothing-pending"], "synced 0 record(s)"),
    ]
    for args, expected in calls:
        proc = fitscope(args, tmp_path, MLFLOW_TRACKING_URI=uri)
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        assert expected in proc.stdout + proc.stderr, (args, proc.stdout, proc.stderr)
    assert (tmp_path / "data" / "processed" / "mnist" / "manifest.json").is_file()
