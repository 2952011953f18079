"""The house rules a newcomer relies on: layers (import-linter), small modules and
functions, and function-level imports for heavy third-party packages only."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

SRC = REPO / "src" / "fitscope"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Declarative tables, allowed to be long: one argparse option per line.
LONG_TABLES = {"fitscope/cli.py:build_parser", "fitscope/bench/__main__.py:build_parser"}
# Packages whose import costs seconds or pulls in a server client: imported where used,
# so that a command that does not need them starts fast (docs/benchmarks.md, start-up).
HEAVY = (
    "torch",
    "pytorch_lightning",
    "lightning",
    "torchmetrics",
    "mlflow",
    "matplotlib",
    "polars",
    "hydra",
    "omegaconf",
    "dvc",
    "ray",
    "submitit",
    "psutil",
    "requests",
    "boto3",
    "pgserver",
    "psycopg2",
    "numpy",
    "optuna",
    "yaml",
    "rich",
    "tqdm",
    "pandas",
    "scipy",
    "grimp",
    "hydra_plugins",
)


def modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_lint_imports_passes_the_layer_contracts():
    """`make lint` runs the same check; here it also guards `make test`."""
    lint = Path(sys.executable).parent / "lint-imports"
    proc = subprocess.run(
        [str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


def test_no_module_is_over_400_lines():
    sizes = {str(p.relative_to(SRC.parent)): len(p.read_text().splitlines()) for p in modules()}
    assert len(sizes) > 40, "the walk found too few modules to mean anything"
    assert {m: n for m, n in sizes.items() if n > MAX_MODULE_LINES} == {}


def test_no_function_is_over_60_lines():
    long = {}
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(SRC.parent)}:{node.name}"
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and where not in LONG_TABLES:
                    long[where] = lines
    assert long == {}


def test_function_level_imports_are_heavy_third_party_packages_only():
    """An import inside a function is for start-up speed (a heavy package), never to step
    around a layer: fitscope's own modules are imported at the top."""
    found = []
    for path in modules():
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    if name.split(".")[0] not in HEAVY:
                        found.append(f"{path.relative_to(SRC.parent)}:{node.lineno} {name}")
    assert found == []


def test_the_scripts_name_modules_and_functions_that_exist():
    """scripts/*.sh run on lent machines that CI never sees (the GPU checks): a module
    moved by a restructuring (``fitscope.synthetic`` -> ``fitscope.data.synthetic``) must
    fail here, not on the GPU."""
    import importlib
    import re

    named = 0
    for script in sorted((REPO / "scripts").glob("*.sh")):
        text = script.read_text()
        for module, names in re.findall(
            r"from (fitscope[\w.]*) import ([\w, ]+?)(?: as \w+)?;", text
        ):
            loaded = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(loaded, name.strip()), f"{script.name}: {module}.{name.strip()}"
                named += 1
        for module in re.findall(r"python -m (fitscope[\w.]*)", text):
            assert importlib.util.find_spec(module) is not None, f"{script.name}: {module}"
            named += 1
    assert named >= 5  # the GPU check names at least the trainer, the bench and three helpers
