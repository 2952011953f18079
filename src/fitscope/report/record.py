"""What the study report puts into MLflow: each dataset's champion in the registry, each
run's verdict and description, each study's report on its parent run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fitscope.report.render import table_md
from fitscope.results.verdict import describe_run, figure_line
from fitscope.tracking.registry import PromotionRule, promote
from fitscope.tracking.run import RunTracker
from fitscope.tracking.store import get_client
from fitscope.tracking.tags import NOTE_TAG


def champion(results: list[Any], dataset: str) -> Any:
    """The dataset's best variant: the lowest mean best validation loss over its seeds."""
    return min(
        (r for r in results if r.dataset == dataset), key=lambda r: r.stat("best_val_loss")[0]
    )


def registry_alias(profile: str) -> str:
    """``champion`` only for the classic protocol; a shortened profile gets its own alias."""
    return "champion" if profile == "classic" else profile


def register_champions(results: list[Any], profile: str, rule: PromotionRule) -> dict[str, str]:
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
    results: list[Any],
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
            _annotate_parent(client, parent_id, note, files[study])


def annotate_diagnostics(
    verdicts: dict[str, dict[str, str]], notes: dict[str, str], files: dict[str, list[Path]]
) -> None:
    """The diagnostics' studies in MLflow: each run gets its verdict (``fitscope.verdict``),
    each parent run ``notes[study]`` as its description and ``files[study]``."""
    client = None
    for study, by_run in verdicts.items():
        parent_ids = set()
        for run_id, run_verdict in by_run.items():
            client = client or get_client()
            RunTracker(client, run_id).set_tags({"fitscope.verdict": run_verdict})
            parent_ids.add(client.get_run(run_id).data.tags.get("mlflow.parentRunId"))
        for parent_id in parent_ids - {None}:
            _annotate_parent(client, parent_id, notes[study], files[study])


def _annotate_parent(client: Any, parent_id: str, note: str, files: list[Path]) -> None:
    """A study's parent run: ``note`` as its description, ``files`` under ``report/``."""
    tracker = RunTracker(client, parent_id)
    tracker.set_tags({NOTE_TAG: note})
    for path in files:
        tracker.log_artifact(path, "report")
