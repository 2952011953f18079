"""The study report: learning curves, a comparison table per dataset, verdicts, champion."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import atomic_path, read_float_csv, write_csv
from fitscope.pipeline.variants import variant_specs
from fitscope.report.calibration import calibration_sections
from fitscope.report.early_stopping import early_stopping_rows
from fitscope.report.render import markdown, page_html, table_md
from fitscope.results.figures import curve_pair, pyplot, save_png
from fitscope.results.seeds import seed_dirs
from fitscope.results.verdict import BASELINES, describe_run, figure_line, verdict
from fitscope.tracking.registry import PromotionRule, promote
from fitscope.tracking.run import RunTracker
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import NOTE_TAG


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
        values = [r[key] for r in self.runs]
        return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


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
    for dataset in {r.dataset for r in results}:
        group = [r for r in results if r.dataset == dataset]
        floor = min(min(h["val/loss"] for h in hist) for r in group for hist in r.histories)
        for r in group:
            r.verdicts = [
                verdict(hist, floor, r.test.get("train_eval_loss"), run.get("constant_val_loss"))
                for hist, run in zip(r.histories, r.runs, strict=True)
            ]
    return results


def _fmt(mean: float, std: float, seeds: int, digits: int = 4) -> str:
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def comparison_rows(results: list[VariantResult], dataset: str) -> list[dict[str, str]]:
    """One table row per variant of ``dataset`` (mean ± std over seeds when several)."""
    rows = []
    for r in (r for r in results if r.dataset == dataset):
        n = len(r.runs)
        row = {
            "variant": r.name,
            "params": str(int(r.runs[0]["n_params"])),
            "val loss": _fmt(*r.stat("best_val_loss"), n),
            "val acc": _fmt(*r.stat("best_val_acc"), n),
        }
        if dataset == "higgs":
            row["val AUROC"] = _fmt(*r.stat("best_val_auroc"), n)
        row["test loss"] = _fmt(r.test["test_loss"], r.test.get("test_loss_std", 0.0), n)
        row["test acc"] = _fmt(r.test["test_acc"], r.test.get("test_acc_std", 0.0), n)
        if dataset == "higgs":
            row["test AUROC"] = _fmt(r.test["test_auroc"], r.test.get("test_auroc_std", 0.0), n)
        row.update(
            {
                "selected epoch": _fmt(*r.stat("best_epoch"), n, 0),
                "stopped epoch": _fmt(*r.stat("stopped_epoch"), n, 0),
                "train-val gap": _fmt(*r.stat("best_gap_loss"), n),
                "verdict": "/".join(sorted(set(r.verdicts))),
                "wall time (s)": _fmt(*r.stat("wall_time_s"), n, 1),
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
    members = [r for r in results if r.name == baseline] + members
    mnist = members[0].dataset == "mnist"
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, r in enumerate(members):
        curve_pair(ax, r.histories[0], "acc" if mnist else "loss", f"C{i}", f"{r.name} ")
    ax.set_xscale("log")
    ax.set_xlabel("epoch (log scale)")
    ax.set_ylabel("accuracy" if mnist else "binary cross-entropy")
    if not mnist:
        ax.set_ylim(top=0.75)
    ax.set_title(f"{study}: train (dashed) vs validation (solid)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    save_png(fig, path)
    return path


def _write_curves(results: list[VariantResult], out: Path) -> None:
    """Seed-0 curves as CSV with plain column names, for `dvc plots show`."""
    for r in results:
        write_csv(
            out / "curves" / f"{r.name}.csv",
            [
                ["epoch", "train_loss", "val_loss", "train_acc", "val_acc"],
                *(
                    [int(h["epoch"]), h["train/loss"], h["val/loss"], h["train/acc"], h["val/acc"]]
                    for h in r.histories[0]
                ),
            ],
        )


def champion(results: list[VariantResult], dataset: str) -> VariantResult:
    """The dataset's best variant: the lowest mean best validation loss over its seeds."""
    return min(
        (r for r in results if r.dataset == dataset), key=lambda r: r.stat("best_val_loss")[0]
    )


def registry_alias(profile: str) -> str:
    """``champion`` only for the classic protocol; a shortened profile gets its own alias."""
    return "champion" if profile == "classic" else profile


def register_champions(
    results: list[VariantResult], profile: str, rule: PromotionRule
) -> dict[str, str]:
    """Register each dataset's best variant (lowest mean best-val-loss), with the profile,
    commit, variant, test metrics and verdict as version tags and description, and move
    the profile's alias (``@champion`` for classic) to it when ``rule`` says it beats the
    version the alias names (one line says so when it does not)."""

    champions = {}
    client = None
    alias = registry_alias(profile)
    for dataset in sorted({r.dataset for r in results}):
        best = champion(results, dataset)
        seed = min(range(len(best.runs)), key=lambda i: best.runs[i]["best_val_loss"])
        run = best.runs[seed]
        model_uri = run.get("mlflow_model_uri")
        if not model_uri:
            continue
        client = client or get_client()
        tracked = client.get_run(run["mlflow_run_id"])
        commit = tracked.data.tags.get("mlflow.source.git.commit", "unknown")
        test = {k: v for k, v in tracked.data.metrics.items() if k.startswith("test/")}
        tags = {
            "fitscope.profile": profile,
            "fitscope.variant": best.name,
            "fitscope.study": best.study,
            "fitscope.commit": commit,
            "fitscope.verdict": best.verdicts[seed],
            **{k: f"{v:.4f}" for k, v in sorted(test.items()) if "class" not in k},
        }
        description = (
            f"{best.name} from the {profile} profile at commit {commit[:7]}, verdict "
            f"{best.verdicts[seed]}. Test: {figure_line(test, 'test/')}; val at the selected "
            f"epoch {int(run['best_epoch'])}: loss {run['best_val_loss']:.4f}."
        )
        name = f"fitscope-{dataset}"
        promotion = promote(
            client,
            name,
            model_uri,
            run["mlflow_run_id"],
            alias,
            tags,
            description,
            model_description=f"Best {dataset} variant of each study run; @champion is the "
            "classic protocol's, other profiles have their own alias (@quick, @debug). An "
            "alias moves only to a version that beats it (params.yaml champion).",
            rule=rule,
        )
        champions[dataset] = _champion_line(name, alias, best.name, promotion)
    return champions


def _champion_line(name: str, alias: str, variant: str, promotion) -> str:
    """The report's line for a dataset's champion; a refusal is also said on the terminal."""
    if promotion.moved:
        return f"models:/{name}@{alias} = {variant} (version {promotion.version})"
    line = (
        f"models:/{name}@{alias} stays on version {promotion.alias_version}: {variant} "
        f"(version {promotion.version}) does not beat it ({promotion.refused})"
    )
    print(f"note: {line}. To move it anyway: dvc exp run -S champion.force=true")
    return line


def annotate_mlflow_runs(
    results: list[VariantResult],
    profile: str,
    tables: dict[str, list[dict[str, str]]],
    files: dict[str, list[Path]],
) -> None:
    """Put the report's answers where `mlflow ui` shows them.

    Each variant's run gets the study verdict (``fitscope.verdict``) and a description
    with its val and test figures; each study's parent run gets the report (``files``:
    per study) and a description holding the study's comparison table.
    """

    client = None
    parents: dict[str, set[str]] = {}
    for r in results:
        for run, run_verdict in zip(r.runs, r.verdicts, strict=True):
            if not run.get("mlflow_run_id"):
                continue
            client = client or get_client()
            tracked = client.get_run(run["mlflow_run_id"])
            metrics = tracked.data.metrics
            note = describe_run(r.name, profile, run_verdict, metrics, metrics, metrics)
            tracker = RunTracker(client, run["mlflow_run_id"])
            tracker.set_tags({"fitscope.verdict": run_verdict, NOTE_TAG: note})
            if "mlflow.parentRunId" in tracked.data.tags:
                parents.setdefault(r.study, set()).add(tracked.data.tags["mlflow.parentRunId"])
    for study, parent_ids in parents.items():
        names = {r.name for r in results if r.study == study}
        dataset = next(r.dataset for r in results if r.study == study)
        rows = [row for row in tables[dataset] if row["variant"] in names]
        note = (
            f"Study report of **{study}** ({profile} profile): the variants compared at "
            f"their selected epochs; `study.md` / `study.html` in the artifacts.\n\n"
            f"{table_md(rows)}"
        )
        for parent_id in parent_ids:
            tracker = RunTracker(client, parent_id)
            tracker.set_tags({NOTE_TAG: note})
            for path in files[study]:
                tracker.log_artifact(path, "report")


def write_study_report(
    params: dict[str, Any],
    runs_root: str | Path = "runs",
    metrics_dir: str | Path = "metrics",
    out: str | Path = "reports",
) -> Path:
    """Write reports/study.md, study.html, figures/*.png, comparison.csv and curves/*.csv
    (each a DVC output of its own: other files in reports/, such as make bench's
    bench.json, are not the report stage's)."""
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
    early = early_stopping_rows(results)
    calibration = calibration_sections(results, out)
    _write_comparison_csv(tables, out / "comparison.csv")
    seeds = max(len(r.runs) for r in results)
    with atomic_path(out / "study.md") as tmp:
        tmp.write_text(markdown(profile, seeds, tables, figures, champions, early, calibration))
    with atomic_path(out / "study.html") as tmp:
        tmp.write_text(page_html(profile, tables, figures, champions, early, calibration))
    shared = [out / "study.md", out / "study.html", out / "comparison.csv"]
    annotate_mlflow_runs(
        results, profile, tables, {s: [*shared, png] for s, png in figures.items()}
    )
    return out / "study.md"


def _write_comparison_csv(tables: dict[str, list[dict[str, str]]], path: Path) -> None:
    lines: list[list[str]] = []
    for dataset, rows in tables.items():  # one header row per dataset: columns differ
        lines.append(["dataset", *rows[0]])
        lines += ([dataset, *row.values()] for row in rows)
    write_csv(path, lines)
