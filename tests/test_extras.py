"""Installing as Python users expect: the core install runs the demo without root or a
browser; a journey that needs an extra says which, in one line, before any work."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from conftest import REPO, last_error_line

# Imported first by every Python started with this directory on PYTHONPATH: the modules
# named in $HIDDEN_MODULES (and their submodules) then look not installed, as in a venv
# installed without the extra that brings them.
SITECUSTOMIZE = """
import importlib.abc, os, sys

HIDDEN = tuple(filter(None, os.environ.get("HIDDEN_MODULES", "").split(",")))


class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == h or name.startswith(h + ".") for h in HIDDEN):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


def without(modules: list[str], cmd: list[str], cwd: Path, tmp_path: Path):
    """Run ``cmd`` with ``modules`` hidden (see SITECUSTOMIZE)."""
    hook = tmp_path / "hide"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
        "HIDDEN_MODULES": ",".join(modules),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # Python subprocesses
@pytest.mark.parametrize(
    ("launcher", "hidden"),
    [
        ("ray", ["ray", "hydra_plugins.hydra_ray_launcher"]),
        ("submitit_local", ["submitit", "hydra_plugins.hydra_submitit_launcher"]),
        ("slurm", ["hydra_plugins.hydra_submitit_launcher"]),
    ],
)
def test_a_cluster_launcher_without_its_extra_names_the_install(launcher, hidden, tmp_path):
    cmd = [sys.executable, "-m", "fitscope.train", "-m", f"hydra/launcher={launcher}", "seed=0,1"]
    proc = without(hidden, cmd, tmp_path, tmp_path)
    line = last_error_line(proc, 2)
    assert line == (
        f"fitscope: error: hydra/launcher={launcher} needs the [cluster] extra "
        f"({', '.join(hidden)} not installed). Fix: `make install-cluster` (or pip install "
        "-e '.[cluster]' in the repository)"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hide"]  # no store, no sweep dir


@pytest.mark.slow  # Python subprocesses
def test_the_team_stack_without_its_extra_names_the_install(tmp_path):
    cmd = [sys.executable, "-m", "fitscope.cli", "stack", "up", "--state-dir", "stack"]
    proc = without(["pgserver"], cmd, tmp_path, tmp_path)
    line = last_error_line(proc, 2)
    assert line == (
        "fitscope: error: the team stack's postgres needs the [team] extra (pgserver not "
        "installed). Fix: `make stack` installs it (or pip install -e '.[team]' in the "
        "repository)"
    )
    assert not (tmp_path / "stack").exists()  # nothing started


def test_the_demo_needs_no_root_and_installs_the_core_only():
    shown = subprocess.run(
        ["make", "-n", "-B", "demo"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert "apt-get" not in shown and "sudo" not in shown, shown
    installs = [line for line in shown.splitlines() if " install " in line and " -e " in line]
    assert installs and all(line.rstrip().endswith("-e .") for line in installs), installs


def test_the_core_dependencies_hold_no_extra():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements):  # with the extras asked for: mlflow[auth] is not mlflow
        return {re.split(r"[<>=!~;\s]", r)[0] for r in requirements}

    core = names(project["dependencies"])
    assert not core & names(extras["cluster"]), "cluster packages in the core"
    assert not core & names(extras["team"]), "team-stack packages in the core"
    assert {"ray[default]", "pgserver", "submitit"} <= names(extras["team"]) | names(
        extras["cluster"]
    )
    assert "fitscope[team,cluster]" in extras["dev"]  # make test tests every journey
