"""The overfitting verdict of a run (the rule, stated once) and the run's one-paragraph
description for the MLflow UI.
"""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

# Each study's unregularized reference: drawn in its figure (the classic plots do), and
# each other variant of the study is compared with it seed by seed (the report).
BASELINES = {
    "higgs_regularization": "higgs-large",
    "mnist_weight_decay": "mnist-wd-none",
    "mnist_dropout": "mnist-none",
    "mnist_augment": "mnist-none",
}
OVERFIT_RISE = 0.02  # late validation loss 2% above its minimum
DIVERGED_FACTOR = 2.0  # best validation loss over twice a constant predictor's
VERDICT_RULE = (
    "**diverged**: the best validation loss is more than twice that of a constant "
    "predictor (one that ignores its input and predicts the training labels' class "
    "frequencies: 0.69 for balanced binary labels, 2.30 for ten balanced classes), so "
    "training made the model far worse than knowing nothing; otherwise "
    "**double descent**: the validation loss, averaged over a sliding window of a tenth of "
    "the run, first fell, then rose more than 4% above its lowest value "
    "so far and later fell more than 2% below that minimum, each step by more than three "
    "times the noise of the averaged curve (a second, lower descent: epoch-wise double "
    "descent, not overfitting); otherwise "
    "**overfitting**: over the last epochs (10, or a tenth of the run if shorter) the mean "
    "validation loss is more than 2% above its minimum while the mean training loss is below "
    "its value at the best epoch (validation got worse as training got better); otherwise "
    "**underfitting**: the selected model's training loss, measured in eval mode (no "
    "dropout), is no lower than the lowest validation loss any variant of the same dataset "
    "reached (the model fits the data it sees worse than the best model fits data it never "
    "saw); otherwise **good fit**. Averaging over the last epochs keeps epoch-to-epoch noise "
    "of a small validation set from deciding."
)


def verdict(
    history: list[dict[str, float]],
    best_val_in_dataset: float,
    train_loss: float | None = None,
    constant_val_loss: float | None = None,
) -> str:
    """Classify one run with the rule in ``VERDICT_RULE``.

    ``train_loss`` is the selected model's eval-mode training loss; without it the
    training loss logged at the best epoch is used. ``constant_val_loss``: a constant
    predictor's validation loss (None: the run's record predates it, no divergence rule).
    """
    best = min(range(len(history)), key=lambda i: history[i]["val/loss"])
    val_best, train_best = history[best]["val/loss"], history[best]["train/loss"]
    if constant_val_loss is not None and val_best > DIVERGED_FACTOR * constant_val_loss:
        return "diverged"
    if double_descent(history):
        return "double descent"
    window = history[-_window(len(history)) :]
    if best < len(history) - 1:
        val_late = sum(r["val/loss"] for r in window) / len(window)
        train_late = sum(r["train/loss"] for r in window) / len(window)
        if val_late > (1 + OVERFIT_RISE) * val_best and train_late < train_best:
            return "overfitting"
    if (train_best if train_loss is None else train_loss) >= best_val_in_dataset:
        return "underfitting"
    return "good fit"


def _window(epochs: int) -> int:
    """Epochs averaged against noise: 10, or a tenth of the run if shorter."""
    return max(1, min(10, epochs // 10))


def double_descent(history: list[dict[str, float]]) -> bool:
    """Whether the validation loss, averaged over a sliding window, first fell, then rose
    well above its lowest value so far and later fell well below it: by more than
    ``2 * OVERFIT_RISE`` and ``OVERFIT_RISE`` of that minimum, each step (the first fall
    too) by more than three times the noise of the averaged curve (estimated from the
    epoch-to-epoch changes), so that a noisy curve that is still descending, or one spike,
    is not mistaken for a second descent. Only full windows are compared; the window is a
    tenth of the run (never shorter than the verdict's): a second descent spans many
    epochs, and a shorter window lets the noise of a long run draw one (the classic
    mnist-augment with the verdict's 10 epochs)."""
    values = [r["val/loss"] for r in history]
    width = max(1, len(values) // 10)
    if len(values) < width + 2:
        return False
    smooth = [
        statistics.fmean(values[i - width + 1 : i + 1]) for i in range(width - 1, len(values))
    ]
    # The robust std of one epoch's value (median absolute change / 0.6745 / sqrt 2), and
    # of a mean of ``width`` of them.
    steps = [abs(b - a) for a, b in itertools.pairwise(values)]
    margin = 3 * statistics.median(steps) / 0.6745 / math.sqrt(2) / math.sqrt(width)
    later_low = list(itertools.accumulate(reversed(smooth), min))[::-1]  # min of smooth[i:]
    lowest = smooth[0]
    for i, value in enumerate(smooth):
        fell = smooth[0] - lowest > margin
        rose = value - lowest > max(2 * OVERFIT_RISE * lowest, margin)
        if fell and rose and lowest - later_low[i] > max(OVERFIT_RISE * lowest, margin):
            return True
        lowest = min(lowest, value)
    return False


def seed_count(verdicts: list[str]) -> str:
    """The verdicts of a variant's seeds with their counts: ``overfitting (3/3 seeds)``,
    ``good fit (2/3 seeds), overfitting (1/3 seeds)``; one seed: its verdict alone."""
    if len(verdicts) == 1:
        return verdicts[0]
    counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{v} ({n}/{len(verdicts)} seeds)" for v, n in ranked)


def dataset_floor(results: list[Any], dataset: str) -> float:
    """The underfitting floor of the verdict rule: the lowest validation loss any variant
    of ``dataset`` reached."""
    group = [r for r in results if r.dataset == dataset]
    return min(min(h["val/loss"] for h in hist) for r in group for hist in r.histories)


def seed_train_loss(run: dict[str, Any], test: dict[str, Any] | None = None) -> float | None:
    """A seed's selected model's training loss in eval mode (an older record: the
    variant's mean from the evaluate stage, else None: the rule uses the logged one)."""
    loss = run.get("train_eval_loss")
    return (test or {}).get("train_eval_loss") if loss is None else loss


def own_verdict(history: list[dict[str, float]], constant_val_loss: float | None = None) -> str:
    """The verdict of one run on its own (at training time, before the report compares the
    dataset's variants): its own lowest validation loss is the underfitting floor."""
    floor = min(r["val/loss"] for r in history)
    return verdict(history, floor, constant_val_loss=constant_val_loss)


def figure_line(values: dict[str, float], prefix: str) -> str:
    """``loss 0.6058, acc 0.6720, AUROC 0.7301`` from ``{prefix}loss`` etc."""
    names = {"loss": "loss", "acc": "acc", "auroc": "AUROC"}
    shown = [(label, values.get(prefix + key)) for key, label in names.items()]
    return ", ".join(f"{label} {value:.4f}" for label, value in shown if value is not None)


def describe_run(
    variant: str,
    profile: str,
    verdict_: str,
    fit: dict[str, float],
    best: dict[str, float],
    test: dict[str, float] | None = None,
    provisional: bool = False,
) -> str:
    """A run's description for the MLflow UI (``mlflow.note.content``), in two lines.

    ``fit`` holds ``fit/best_epoch``, ``fit/stopped_epoch``, ``fit/early_stopped``;
    ``best`` the ``best/val/*`` metrics; ``test`` the ``test/*`` ones once evaluated.
    """
    early = "early stopping" if fit.get("fit/early_stopped") else "epoch limit"
    basis = " (against its own best val loss; the study report compares variants)"
    line1 = (
        f"**{variant}** ({profile} profile): **{verdict_}**{basis if provisional else ''}. "
        f"Selected epoch {int(fit['fit/best_epoch'])}, stopped at epoch "
        f"{int(fit['fit/stopped_epoch'])} ({early})."
    )
    line2 = f"Val at the selected epoch: {figure_line(best, 'best/val/')}"
    if test:
        line2 += f". Test: {figure_line(test, 'test/')}"
    return f"{line1}\n\n{line2}."
