"""Hyperparameter-search report: ``python -m fitscope.report.search <study or parent run id>``.

Writes ``reports/search/<study>/``: a table of the top trials, the figures of Optuna's
own plots from the search's stored study (report.search_figures), and (when the other
sampler's search exists) the best objective reached after N trials, side by side. The
report's files are also logged to the search's parent run (``search_report/``).
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass
from pathlib import Path

from fitscope.core.errors import FitscopeError, run_cli
from fitscope.core.fileio import atomic_path, write_csv
from fitscope.report.search_figures import FIGURES, optuna_figures
from fitscope.search.storage import STORAGE_TAG, STUDY_TAG, load_recorded_study
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import PARENT_TAG, PRUNED_TAG, TAG, tag_equals

PAIRS = {"mnist_search_random": "mnist_search_tpe", "mnist_search_tpe": "mnist_search_random"}
OBJECTIVE = "best/val/acc"


@dataclass
class Trial:
    run_id: str
    number: int
    status: str
    lr: float
    weight_decay: float  # lambda in 0.5 * lambda * sum(W^2), i.e. 2 * regularization.l2
    objective: float | None
    best_epoch: int | None
    epochs: int
    pruned: bool = False


def find_parent(client, name_or_id: str):
    """The newest parent run of study ``name_or_id``, or the run with that id."""
    if re.fullmatch(r"[0-9a-f]{32}", name_or_id):
        return client.get_run(name_or_id)
    exp = client.get_experiment_by_name(name_or_id)
    if exp is None:
        raise FitscopeError(
            f"no MLflow experiment or run {name_or_id!r}. Fix: run the search "
            "first (`python -m fitscope.train -m hparams_search=mnist_random`)"
        )
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=tag_equals(f"{TAG}role", "parent"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise FitscopeError(
            f"experiment {name_or_id!r} has no search parent run. Fix: run the "
            "search with `-m` so its trials are grouped"
        )
    return parents[0]


def load_trials(client, parent) -> list[Trial]:
    """Every child run of the search, in trial order."""
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=tag_equals(PARENT_TAG, parent.info.run_id),
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    # A forced re-run of the search (the DVC stage) files new runs under the same parent:
    # the newest run of each trial (its name, trial-<number>) wins.
    latest = {run.data.tags.get(f"{TAG}variant", run.info.run_id): run for run in runs}
    trials = []
    for name, run in latest.items():
        p, m = run.data.params, run.data.metrics
        number = re.fullmatch(r"trial-(\d+)", name)
        trials.append(
            Trial(
                run_id=run.info.run_id,
                number=int(number.group(1)) if number else -1,
                status=run.info.status,
                lr=float(p["optimizer.lr"]),
                weight_decay=2 * float(p["regularization.l2"]),
                objective=m.get(OBJECTIVE) if run.info.status == "FINISHED" else None,
                best_epoch=int(m["fit/best_epoch"]) if "fit/best_epoch" in m else None,
                epochs=int(p.get("trainer.max_epochs", 0)),
                pruned=PRUNED_TAG in run.data.tags,
            )
        )
    return sorted(trials, key=lambda t: (t.number, t.run_id))


def best_so_far(trials: list[Trial]) -> list[float]:
    """Best objective after each trial (failed trials keep the previous best)."""
    best, out = -math.inf, []
    for t in trials:
        if t.objective is not None:
            best = max(best, t.objective)
        out.append(best)
    return out


def write_search_report(
    name_or_id: str, out_root: str | Path = "reports/search", top_n: int = 20
) -> Path:
    """Write the search report; return the path of its markdown file."""
    client = get_client()
    parent = find_parent(client, name_or_id)
    study = client.get_experiment(parent.info.experiment_id).name
    trials = load_trials(client, parent)
    if not trials:
        raise FitscopeError(f"search {study!r} has no trials. Fix: run it first")
    other, other_parent = None, None
    if study in PAIRS and client.get_experiment_by_name(PAIRS[study]) is not None:
        other_parent = find_parent(client, PAIRS[study])
        other = load_trials(client, other_parent)
    out = Path(out_root) / study
    out.mkdir(parents=True, exist_ok=True)
    finished = [t for t in trials if t.objective is not None and not t.pruned]
    ranked = sorted(finished, key=lambda t: -t.objective)
    top = ranked[:top_n]
    pngs = _figures(client, parent, other_parent, out)
    _write_trials_csv(trials, out / "trials.csv")
    failed = sum(t.objective is None for t in trials)
    pruned = sum(t.pruned for t in trials)
    md = [
        f"# Hyperparameter search `{study}`\n",
        f"Parent run `{parent.info.run_id}`: {len(trials)} trials, {len(ranked)} finished, "
        f"{pruned} pruned, {failed} failed. Objective: best validation accuracy of a trial.\n",
        f"## Top {len(top)} trials\n",
        "| rank | trial | learning rate | weight decay | best val acc | best epoch | run |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {i} | {t.number} | {t.lr:.3g} | {t.weight_decay:.3g} | {t.objective:.4f} | "
        f"{t.best_epoch} | `{t.run_id}` |"
        for i, t in enumerate(top, start=1)
    ]
    if other is not None:
        md += _sampler_comparison(study, trials, other)
    md += _figures_markdown(pngs)
    with atomic_path(out / "search.md") as tmp:
        tmp.write_text("\n".join(md))
    for name in (*pngs, "trials.csv", "search.md"):
        client.log_artifact(parent.info.run_id, str(out / name), "search_report")
    return out / "search.md"


def _recorded_study(parent) -> object | None:
    tags = parent.data.tags
    if STUDY_TAG not in tags:
        return None
    return load_recorded_study(tags[STUDY_TAG], tags.get(STORAGE_TAG, "memory"))


def _figures(client, parent, other_parent, out: Path) -> list[str]:
    """Optuna's figures of the search (and its pair's history), where its study is
    reachable from here."""
    study = _recorded_study(parent)
    if study is None:
        return []
    other = _recorded_study(other_parent) if other_parent is not None else None
    return optuna_figures(study, other, out)


def _figures_markdown(pngs: list[str]) -> list[str]:
    if not pngs:
        return [
            "",
            "No figures: the search's Optuna study is not reachable from here (kept in "
            "memory, or its storage is gone); set `hydra.sweeper.storage` to keep it.",
            "",
        ]
    md = ["", "## Figures (Optuna's plots of the stored study)\n"]
    for png in pngs:
        md += [f"{FIGURES[png][0].upper()}{FIGURES[png][1:]}:\n", f"![{png}]({png})", ""]
    return md


def _write_trials_csv(trials: list[Trial], path: Path) -> None:
    header = ["trial", "run_id", "status", "lr", "weight_decay", "best_val_acc", "best_epoch"]
    rows = [
        [
            t.number,
            t.run_id,
            t.status,
            t.lr,
            t.weight_decay,
            "" if t.objective is None else t.objective,
            t.best_epoch or "",
        ]
        for t in trials
    ]
    write_csv(path, [header, *rows])


def _sampler_comparison(study: str, trials: list[Trial], other: list[Trial]) -> list[str]:
    """Markdown: this sampler against its pair on the same budget (best so far after N)."""
    mine, theirs = best_so_far(trials), best_so_far(other)
    marks = [n for n in (5, 10, 25, 50, 100) if n <= min(len(mine), len(theirs))]
    budgets = {
        name: f"{len(ts)} trials of {max(t.epochs for t in ts)} epochs"
        for name, ts in ((study, trials), (PAIRS[study], other))
    }
    same = len(set(budgets.values())) == 1
    return [
        "",
        "## Random vs TPE on the same budget\n",
        f"Budgets: {study} {budgets[study]}, {PAIRS[study]} {budgets[PAIRS[study]]}"
        + ("." if same else " (**not the same budget**: compare with care).")
        + "\n",
        f"Best validation accuracy reached after N trials ({study} | {PAIRS[study]}):\n",
        *(f"- N = {n}: {mine[n - 1]:.4f} | {theirs[n - 1]:.4f}" for n in marks),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fitscope.report.search", description=__doc__)
    parser.add_argument("search", help="study name (MLflow experiment) or parent run id")
    parser.add_argument("--out", default="reports/search")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)

    path = run_cli(lambda: write_search_report(args.search, args.out, args.top))
    print(f"search report written to {path}")


if __name__ == "__main__":
    main()
