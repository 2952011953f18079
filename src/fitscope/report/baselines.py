"""The report's "Against the baseline" section: each regularizer's best validation loss
minus its study's unregularized baseline's, seed by seed, with a paired t interval."""

from __future__ import annotations

from typing import Any

from fitscope.report.render import Block, Section
from fitscope.results.bands import CONFIDENCE, paired_difference
from fitscope.results.verdict import BASELINES

SENTENCE = (
    "Each regularized variant against its study's unregularized baseline: the difference "
    "in best validation loss (variant - baseline), paired by seed (the same seed draws the "
    f"same data order and initial weights), its mean and the {CONFIDENCE:.0%} confidence "
    "interval of the paired t-test (scipy.stats.ttest_rel). An interval below 0: the "
    "regularizer found a lower validation loss; one holding 0: no clear difference at this "
    "number of seeds; with one seed there is no interval (study.seeds: 0,1,2)."
)


def _by_seed(result: Any) -> dict[str, float]:
    pairs = zip(result.run_dirs, result.runs, strict=True)
    return {run_dir.name: run["best_val_loss"] for run_dir, run in pairs}


def baseline_section(results: list[Any]) -> Section:
    """A table per dataset: one row per variant whose study has a baseline in BASELINES."""
    by_name = {r.name: r for r in results}
    tables: dict[str, list[dict[str, str]]] = {}
    for r in results:
        base = by_name.get(BASELINES.get(r.study, ""))
        if base is None or base is r or not _by_seed(r).keys() & _by_seed(base).keys():
            continue
        diff = paired_difference(_by_seed(r), _by_seed(base))
        interval = "n/a" if diff.low is None else f"[{diff.low:+.4f}, {diff.high:+.4f}]"
        tables.setdefault(r.dataset, []).append(
            {
                "variant": r.name,
                "baseline": base.name,
                "seeds paired": str(diff.pairs),
                "Δ best val loss": f"{diff.mean:+.4f}",
                f"{CONFIDENCE:.0%} interval": interval,
                "reading": diff.reading(),
            }
        )
    return Section(
        "Against the baseline", SENTENCE, [Block(d.upper(), rows) for d, rows in tables.items()]
    )
