"""The whole study timed as a user runs it (``--study``): ``dvc repro`` in a scratch copy."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml


def study_minutes(profile: str, one_variant_per_dataset: bool = False) -> float:
    """Wall minutes of ``dvc repro`` (the study, ``study.profile=profile``) in a scratch copy
    of this checkout (what git tracks plus untracked, unignored files), with its own
    MLflow store: nothing here is touched. ``one_variant_per_dataset``: only the first
    variant of each dataset, seed 0 (``--smoke``)."""
    root = Path(subprocess.check_output(["git", "rev-parse", "--show-toplevel"], text=True).strip())
    listed = subprocess.check_output(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root, text=True
    )
    with tempfile.TemporaryDirectory(prefix="fitscope-study-") as tmp:
        copy = Path(tmp) / "repo"
        for name in filter(None, listed.split("\0")):
            if (root / name).is_file():
                (copy / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(root / name, copy / name)
        params = copy / "params.yaml"
        params.write_text(params.read_text().replace("profile: classic", f"profile: {profile}", 1))
        if one_variant_per_dataset:
            values = yaml.safe_load(params.read_text())
            values["study"] |= {"seeds": "0", "jobs": 1}
            values["variants"] = {
                d: dict([next(iter(v.items()))]) for d, v in values["variants"].items()
            }
            params.write_text(yaml.safe_dump(values, sort_keys=False))
        git = ["git", "-c", "user.email=bench@fitscope.invalid", "-c", "user.name=bench"]
        for cmd in (["git", "init", "-q"], ["git", "add", "-A"], [*git, "commit", "-qm", "s"]):
            subprocess.run(cmd, cwd=copy, check=True, capture_output=True)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}"}
        # The stages import the copy's code, whichever checkout the venv was installed from.
        paths = [str(copy / "src"), env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        env.pop("FITSCOPE_PARENT_RUN_ID", None)
        # The stages call `fitscope`: the venv's scripts first on PATH, as `make` puts them.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        dvc = Path(sys.executable).with_name("dvc")
        start = time.perf_counter()
        subprocess.run([str(dvc), "repro"], cwd=copy, env=env, check=True)
        return (time.perf_counter() - start) / 60
