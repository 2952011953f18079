"""The study report: learning curves, a comparison table per dataset, verdicts, champion."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import atomic_path, read_float_csv, write_csv
from fitscope.pipeline.variants import variant_specs
from fitscope.report.baselines import baseline_section
from fitscope.report.calibration import calibration_section
from fitscope.report.diagnostics import diagnostic_report
from fitscope.report.early_stopping import early_stopping_section
from fitscope.report.record import annotate_diagnostics, annotate_mlflow_runs, register_champions
from fitscope.report.render import fmt_mean, markdown, page_html, table_md
from fitscope.results.bands import mean_std
from fitscope.results.contract import write_comparison_csv
from fitscope.results.figures import band_pair, pyplot, save_png
from fitscope.results.seeds import seed_dirs
from fitscope.results.verdict import BASELINES, dataset_floor, seed_count, seed_train_loss, verdict
from fitscope.tracking.registry import PromotionRule


@dataclass
class VariantResult:
    name: str
    dataset: str
    study: str
    runs: list[dict[str, Any]]  # metrics.json of each seed
    histories: list[list[dict[str, float]]]
    run_dirs: list[Path]  # one per seed, in seed order (seed 0 first)
    test: dict[str, Any]
    verdicts: list[str] = field(default_factory=list)

    def stat(self, key: str) -> tuple[float, float]:
        return mean_std([r[key] for r in self.runs])


def load_results(params: dict[str, Any], runs_root: Path, metrics_dir: Path) -> list[VariantResult]:
    """Everything the report needs, per variant in params.yaml order."""
    results = []
    tests: dict[str, dict[str, Any]] = {}
    for name, spec in variant_specs(params).items():
        dataset = spec["dataset"]
        dirs = seed_dirs(runs_root / dataset / name)
        test_path = metrics_dir / f"{dataset}.json"
        if dataset not in tests:
            if not test_path.exists():
                raise FitscopeError(f"{test_path} not found. Fix: run `dvc repro` (evaluate stage)")
            tests[dataset] = json.loads(test_path.read_text())
        if name not in tests[dataset]:
            raise FitscopeError(
                f"{test_path} has no {name}. Fix: run `dvc repro` (evaluate@{dataset})"
            )
        results.append(
            VariantResult(
                name=name,
                dataset=dataset,
                study=spec["study"],
                runs=[json.loads((d / "metrics.json").read_text()) for d in dirs],
                run_dirs=dirs,
                histories=[read_float_csv(d / "history.csv") for d in dirs],
                test=tests[dataset][name],
            )
        )
    if not results:
        raise FitscopeError("params.yaml lists no variants. Fix: add some under `variants:`")
    for r in results:  # each seed judged on its own (its eval-mode training loss)
        floor = dataset_floor(results, r.dataset)
        r.verdicts = [
            verdict(hist, floor, seed_train_loss(run, r.test), run.get("constant_val_loss"))
            for hist, run in zip(r.histories, r.runs, strict=True)
        ]
    return results


def comparison_rows(results: list[VariantResult], dataset: str) -> list[dict[str, str]]:
    """One table row per variant of ``dataset`` (mean ± std over seeds when several)."""
    rows = []
    for r in (r for r in results if r.dataset == dataset):
        n = len(r.runs)
        row = {
            "variant": r.name,
            "params": str(int(r.runs[0]["n_params"])),
            "val loss": fmt_mean(*r.stat("best_val_loss"), n),
            "val acc": fmt_mean(*r.stat("best_val_acc"), n),
        }
        if dataset == "higgs":
            row["val AUROC"] = fmt_mean(*r.stat("best_val_auroc"), n)
        row["test loss"] = fmt_mean(r.test["test_loss"], r.test.get("test_loss_std", 0.0), n)
        row["test acc"] = fmt_mean(r.test["test_acc"], r.test.get("test_acc_std", 0.0), n)
        if dataset == "higgs":
            row["test AUROC"] = fmt_mean(r.test["test_auroc"], r.test.get("test_auroc_std", 0.0), n)
        row.update(
            {
                "selected epoch": fmt_mean(*r.stat("best_epoch"), n, 0),
                "stopped epoch": fmt_mean(*r.stat("stopped_epoch"), n, 0),
                "train-val gap": fmt_mean(*r.stat("best_gap_loss"), n),
                "verdict": seed_count(r.verdicts),
                "wall time (s)": fmt_mean(*r.stat("wall_time_s"), n, 1),
                # trainer.precision as it ran (auto resolves per machine); "-": not recorded
                "precision": "/".join(sorted({str(x.get("precision", "-")) for x in r.runs})),
                "MLflow run": ", ".join(str(x.get("mlflow_run_id", "-")) for x in r.runs),
            }
        )
        rows.append(row)
    return rows


def _figure(results: list[VariantResult], study: str, path: Path) -> Path:
    plt = pyplot()
    members = [r for r in results if r.study == study]
    baseline = BASELINES.get(study)
    if baseline not in {r.name for r in members}:
        members = [r for r in results if r.name == baseline] + members
    mnist = members[0].dataset == "mnist"
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(members):
        band_pair(ax, r.histories, "acc" if mnist else "loss", f"C{i}", f"{r.name} ")
    ax.set_xscale("log")
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("accuracy" if mnist else "binary cross-entropy")
    if not mnist:
        ax.set_ylim(top=0.75)
    seeds = max(len(r.histories) for r in members)
    band = f", mean ± std of {seeds} seeds" if seeds > 1 else ""
    ax.set_title(f"{study}: train (dashed) vs validation (solid){band}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)
    return path


CURVE_COLUMNS = {"train_loss": "train/loss", "val_loss": "val/loss", "train_acc": "train/acc"}
CURVE_COLUMNS["val_acc"] = "val/acc"


def _write_curves(results: list[VariantResult], out: Path) -> None:
    """Curves as CSV with plain column names, for `dvc plots show`: ``curves/<variant>.csv``
    the first seed's (the named plots in dvc.yaml), ``curves/seeds/<variant>/<seed>.csv``
    every seed's when there are several (the ``reports/curves`` plot draws each)."""
    for r in results:
        named = {out / "curves" / f"{r.name}.csv": r.histories[0]}
        if len(r.histories) > 1:
            named |= {
                out / "curves" / "seeds" / r.name / f"{d.name}.csv": h
                for d, h in zip(r.run_dirs, r.histories, strict=True)
            }
        for path, history in named.items():
            write_csv(
                path,
                [
                    ["epoch", *CURVE_COLUMNS],
                    *([int(h["epoch"]), *(h[k] for k in CURVE_COLUMNS.values())] for h in history),
                ],
            )


def write_study_report(
    params: dict[str, Any],
    runs_root: str | Path = "runs",
    metrics_dir: str | Path = "metrics",
    out: str | Path = "reports",
) -> Path:
    """Write reports/study.md, study.html, figures/*.png, comparison.csv, curves/*.csv and
    the diagnostics' plot files (each a DVC output of its own: other files in reports/,
    such as make bench's bench.json, are not the report stage's)."""
    out = Path(out)
    results = load_results(params, Path(runs_root), Path(metrics_dir))
    profile = (params.get("study") or {}).get("profile", "classic")
    figures = {
        s: _figure(results, s, out / "figures" / f"{s}.png")
        for s in dict.fromkeys(r.study for r in results)
    }
    _write_curves(results, out)
    champions = register_champions(
        results, profile, PromotionRule.from_params(params.get("champion"))
    )
    tables = {d: comparison_rows(results, d) for d in dict.fromkeys(r.dataset for r in results)}
    diagnosed = diagnostic_report(params, results, Path(runs_root), out)
    calibration = calibration_section(results, out)
    sections = [
        baseline_section(results),
        *diagnosed.sections,
        early_stopping_section(results),
        calibration,
    ]
    sections = [s for s in sections if s.blocks]
    write_comparison_csv(tables, out / "comparison.csv")
    seeds = max(len(r.runs) for r in results)
    with atomic_path(out / "study.md") as tmp:
        tmp.write_text(markdown(profile, seeds, tables, figures, champions, sections))
    with atomic_path(out / "study.html") as tmp:
        tmp.write_text(page_html(profile, tables, figures, champions, sections))
    _record(results, profile, tables, figures, calibration, diagnosed, out)
    return out / "study.md"


def _record(results, profile, tables, figures, calibration, diagnosed, out: Path) -> None:
    """The report's answers on the MLflow runs: each study's files go to its parents (the
    dataset's calibration figure too), each diagnostic's table and figure to its own."""
    shared = [out / "study.md", out / "study.html", out / "comparison.csv"]
    calibration_pngs = {b.title.lower(): b.figure for b in calibration.blocks if b.figure}
    annotate_mlflow_runs(
        results,
        profile,
        tables,
        {
            s: [*shared, png, *filter(None, [calibration_pngs.get(_dataset(results, s))])]
            for s, png in figures.items()
        },
    )
    annotate_diagnostics(
        diagnosed.verdicts,
        {
            s: f"Diagnostic **{s}** ({profile} profile): each point's best val loss and train "
            f"loss; `study.md` / `study.html` in the artifacts.\n\n{table_md(b.rows)}"
            for s, b in diagnosed.blocks.items()
        },
        {s: [*shared, b.figure] for s, b in diagnosed.blocks.items()},
    )


def _dataset(results: list[VariantResult], study: str) -> str:
    return next(r.dataset for r in results if r.study == study)
