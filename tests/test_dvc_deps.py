"""DVC dependencies follow the code: every stage depends on each fitscope module its
command imports (found from the import graph, function-level imports included), so a
change to any of them makes `dvc status` list the stage as changed."""

from __future__ import annotations

import importlib
from functools import cache
from pathlib import Path

import grimp
import pytest
from conftest import REPO, make_repo_copy

from fitscope.cli import COMMANDS

SRC = REPO / "src"
PLUGIN = "src/hydra_plugins/fitscope_sweeper/__init__.py"


@cache
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("fitscope", include_external_packages=True, cache_dir=None)


def command_modules(cmd: str) -> set[str]:
    """The modules a stage's command line starts in (`fitscope SUB` or `python -m MOD`)."""
    found = set()
    for part in cmd.split("&&"):
        words = part.split()
        if words[:1] == ["fitscope"]:
            module, _ = COMMANDS[words[1]].split(":")
            found |= {"fitscope.cli", module}
        elif words[:2] == ["python", "-m"]:
            found.add(words[2])
        else:
            raise AssertionError(f"a stage command this test cannot follow: {part!r}")
    return found


def imported_files(cmd: str) -> set[str]:
    """Every source file that running ``cmd`` imports: the command's modules, everything
    they import (transitively), and the packages above each (their __init__ runs first)."""
    modules = set()
    for start in command_modules(cmd):
        modules |= {start, *graph().find_upstream_modules(start)}
    files = set()
    for module in modules:
        if module == "hydra_plugins":  # the job-list sweeper, imported by name
            files.add(PLUGIN)
        if not module.startswith("fitscope"):
            continue
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            spec = importlib.util.find_spec(".".join(parts[:depth]))
            files.add(str(Path(spec.origin).relative_to(REPO)))
    return files


def stages(repo_dir: Path) -> dict[str, tuple[str, list[str]]]:
    """Every stage of dvc.yaml and search/dvc.yaml: its command and dependency paths."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        found = {}
        for stage in repo.index.stages:
            if not getattr(stage, "cmd", None):
                continue  # data.dvc
            root = Path(stage.wdir).relative_to(repo_dir.resolve())
            deps = [str(root / d.def_path) for d in stage.deps]
            found[stage.addressing] = (stage.cmd, [str(Path(d)) for d in deps])
        return found


def covered(path: str, deps: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in deps)


def test_every_stage_depends_on_every_module_its_command_imports():
    found = stages(REPO)
    assert {"fetch_higgs", "train@higgs", "report", "search/dvc.yaml:search@tpe"} <= set(found)
    missing = {}
    for name, (cmd, deps) in found.items():
        files = imported_files(cmd)
        assert "src/fitscope/cli.py" in files or "python -m" in cmd
        missing[name] = sorted(f for f in files if not covered(f, deps))
    assert {name: files for name, files in missing.items() if files} == {}
    # The module that decides bf16 or fp32 is one of train@higgs's (the drift that was found).
    assert "src/fitscope/training/precision.py" in imported_files(found["train@higgs"][0])


def _placeholders(repo_dir: Path) -> None:
    """Stand-ins for every stage's outputs, so `dvc commit` can record the stages."""
    from dvc.repo import Repo

    with Repo(str(repo_dir)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                path = Path(out.fs_path)
                if path.suffix:  # a file (metrics/higgs.json, reports/study.md)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text("placeholder\n")
                else:
                    path.mkdir(parents=True, exist_ok=True)
                    (path / "placeholder").write_text("placeholder\n")


@pytest.mark.slow
def test_a_comment_in_any_imported_module_makes_dvc_status_list_the_stage(tmp_path, monkeypatch):
    from dvc.repo import Repo

    repo_dir = make_repo_copy(tmp_path / "repo")
    monkeypatch.chdir(repo_dir)  # DVC resolves a stage's wdir against the working directory
    _placeholders(repo_dir)
    with Repo(str(repo_dir)) as repo:
        repo.commit(None, force=True)
    found = stages(repo_dir)
    users: dict[str, set[str]] = {}
    for name, (cmd, _) in found.items():
        for file in imported_files(cmd):
            users.setdefault(file, set()).add(name)
    assert len(users) > 40
    wrong = {}
    for file, expected in sorted(users.items()):
        source = repo_dir / file
        before = source.read_text()
        source.write_text(before + "# a comment appended by test_dvc_deps\n")
        try:
            with Repo(str(repo_dir)) as repo:
                changed = {name for name in repo.status() if name in found}
        finally:
            source.write_text(before)
        if not expected <= changed:
            wrong[file] = sorted(expected - changed)
    assert wrong == {}
    with Repo(str(repo_dir)) as repo:  # everything reverted: nothing is left changed
        assert {name for name in repo.status() if name in found} == set()
