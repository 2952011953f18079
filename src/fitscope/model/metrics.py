"""Losses and metrics of a model's outputs: the loss by hand (it is the training
objective), accuracy and AUROC from torchmetrics (functional, once per epoch), and the
held-out test scores of a trained model.

Only processes that train or score import this (torchmetrics' import pulls in scipy; the
Lightning import of a training process already pays it): the evaluate stage, the report
and the summary read the figures from metrics.json.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


def data_loss(task: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits (binary) or cross-entropy (multiclass), without any penalty."""
    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), targets)
    return F.cross_entropy(logits, targets)


@torch.no_grad()
def classification_metrics(
    task: str, logits: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Loss, accuracy (and exact AUROC for binary) of one split, scored by torchmetrics.

    Binary scores are probabilities (sigmoid of the logit); accuracy counts a probability
    above 0.5 as positive (torchmetrics' rule; Keras' ``accuracy`` on a logit output
    thresholds the logit instead, a quirk not reproduced). AUROC is exact
    (``thresholds=None``): 0.0 when one class is absent, as torchmetrics returns.
    """
    from torchmetrics.functional.classification import (
        binary_accuracy,
        binary_auroc,
        multiclass_accuracy,
    )

    loss = data_loss(task, logits, targets).item()
    if task == "binary":
        probs, labels = torch.sigmoid(logits.squeeze(-1)), targets.long()
        return {
            "loss": loss,
            "acc": binary_accuracy(probs, labels, threshold=0.5).item(),
            "auroc": binary_auroc(probs, labels, thresholds=None).item(),
        }
    acc = multiclass_accuracy(logits, targets, num_classes=num_classes, average="micro")
    return {"loss": loss, "acc": acc.item()}


@torch.no_grad()
def per_class_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Accuracy within each true class (``acc_class_<k>``); a class not present is left out."""
    from torchmetrics.functional.classification import multiclass_accuracy

    per_class = multiclass_accuracy(logits, targets, num_classes=num_classes, average=None)
    present = torch.bincount(targets, minlength=num_classes) > 0
    return {f"acc_class_{k}": per_class[k].item() for k in range(num_classes) if present[k]}


SCORE_ROWS = 65_536  # rows per forward pass: 10.5M full-HIGGS rows at once need GBs


Scored = tuple[torch.Tensor, torch.Tensor]  # logits and targets of a split


def _forward(model: torch.nn.Module, x: Any) -> torch.Tensor:
    """Logits of ``x`` (a tensor or a memory-mapped array) computed in slices on the
    model's device (a GPU scores 10.5M rows in seconds, one CPU thread in minutes)."""
    device = next(model.parameters()).device
    parts = []
    for start in range(0, len(x), SCORE_ROWS):
        part = x[start : start + SCORE_ROWS]
        if not isinstance(part, torch.Tensor):
            part = torch.from_numpy(np.array(part, dtype=np.float32))  # a copy: maps are read-only
        parts.append(model(part.to(device)).float().cpu())
    return torch.cat(parts)


def targets_tensor(y: Any, task: str) -> torch.Tensor:
    """Labels as the loss wants them: float for BCE (binary), long for cross-entropy.

    Arrays are copied (a memory-mapped split is read-only); tensors are returned as is.
    """
    if isinstance(y, torch.Tensor):
        return y
    y = torch.from_numpy(np.array(y))
    return y.float() if task == "binary" else y.long()


@torch.no_grad()
def constant_loss(train_labels: Any, val_labels: Any, num_classes: int) -> float:
    """The validation loss (BCE, or cross-entropy) of a model that ignores its input and
    predicts the training labels' class frequencies: what any model that learned beats."""
    counts = np.bincount(np.asarray(train_labels).astype(np.int64), minlength=num_classes)
    frequencies = np.clip(counts / counts.sum(), 1e-7, 1.0)
    return float(-np.log(frequencies[np.asarray(val_labels).astype(np.int64)]).mean())


@torch.no_grad()
def test_logits(model: torch.nn.Module, task: str, test: tuple[Any, Any]) -> Scored:
    """The model's logits (eval mode) on the test split and the split's targets."""
    return _forward(model.eval(), test[0]), targets_tensor(test[1], task)


def test_scores(
    model: torch.nn.Module,
    task: str,
    num_classes: int,
    test: tuple[Any, Any],
    train: tuple[Any, Any] | None = None,
    scored: Scored | None = None,
) -> dict[str, float]:
    """The held-out test metrics of a trained model (eval mode): loss, accuracy (AUROC
    for binary), the expected calibration error (``ece``), per-class accuracies for
    multiclass, and with ``train`` its training loss in eval mode (``train_eval_loss``).

    Each split is tensors or memory-mapped arrays (the full HIGGS training split), scored
    in slices. The training loss logged during training has dropout active (as in
    Keras); the eval-mode one is what "how well does the model fit its training data" means.
    ``scored``: the model's ``test_logits``, when the caller has them already.
    """
    model = model.eval()
    logits, y = scored or test_logits(model, task, test)
    result = classification_metrics(task, logits, y, num_classes)
    result["ece"] = calibration_error(task, logits, y, num_classes)
    if task == "multiclass":
        result.update(per_class_accuracy(logits, y, num_classes))
    if train is not None:
        train_logits = _forward(model, train[0])
        train_y = targets_tensor(train[1], task)
        result["train_eval_loss"] = data_loss(task, train_logits, train_y).item()
    return result


CALIBRATION_BINS = 15


@torch.no_grad()
def calibration_error(
    task: str, logits: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> float:
    """Expected calibration error (torchmetrics, 15 equal-width bins, L1): the mean gap
    between confidence and accuracy, weighted by how many predictions fall in each bin.
    Over-fit networks are over-confident, which accuracy and AUROC do not show."""
    from torchmetrics.functional.classification import (
        binary_calibration_error,
        multiclass_calibration_error,
    )

    if task == "binary":
        probs = torch.sigmoid(logits.squeeze(-1))
        return binary_calibration_error(probs, targets.long(), n_bins=CALIBRATION_BINS).item()
    return multiclass_calibration_error(
        logits.softmax(-1), targets, num_classes=num_classes, n_bins=CALIBRATION_BINS
    ).item()


@torch.no_grad()
def test_curves(
    model: torch.nn.Module, task: str, test: tuple[Any, Any], scored: Scored | None = None
) -> dict[str, list]:
    """The test split's curves, each a header row and its rows: the reliability
    diagram's bins (``calibration``: the mean confidence and the accuracy of the
    predictions in each of the ECE's 15 bins) and, for a binary task, ROC and
    precision-recall curves (torchmetrics, exact thresholds). ``scored``: as for
    ``test_scores``."""
    from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

    logits, y = scored or test_logits(model, task, test)
    if task == "binary":
        probs = torch.sigmoid(logits.squeeze(-1))
        # torchmetrics' binary ECE: confidence = P(positive), "accuracy" = the label.
        confidence, correct = probs, y.float()
    else:
        confidence, predicted = logits.softmax(-1).max(-1)
        correct = (predicted == y).float()
    # torchmetrics' binning: 15 bins of [low, high), and a 16th for a confidence of exactly 1.
    edges = torch.linspace(0, 1, CALIBRATION_BINS + 1)
    bins = torch.bucketize(confidence, edges, right=True) - 1
    highs = [*edges[1:].tolist(), 1.0]
    calibration = [
        [
            float(edges[b]),
            highs[b],
            float(confidence[bins == b].mean()),
            float(correct[bins == b].mean()),
            int((bins == b).sum()),
        ]
        for b in range(CALIBRATION_BINS + 1)
        if (bins == b).any()
    ]
    header = ["bin_low", "bin_high", "confidence", "accuracy", "count"]
    curves: dict[str, list] = {"calibration": [header, *calibration]}
    if task == "binary":
        fpr, tpr, _ = binary_roc(probs, y.long(), thresholds=None)
        precision, recall, _ = binary_precision_recall_curve(probs, y.long(), thresholds=None)
        curves["roc"] = [["fpr", "tpr"], *_thin(fpr, tpr)]
        curves["pr"] = [["recall", "precision"], *_thin(recall, precision)]
    return curves


CURVE_POINTS = 1000  # exact curves have a point per distinct score: 500k on full HIGGS


def _thin(x: torch.Tensor, y: torch.Tensor) -> list[list[float]]:
    """At most ``CURVE_POINTS`` points of an exact curve, evenly spaced along it, both
    ends kept (the figure and `dvc plots` need no more; AUROC stays exact)."""
    keep = torch.linspace(0, len(x) - 1, min(len(x), CURVE_POINTS)).round().long().unique()
    return torch.stack([x[keep], y[keep]], dim=1).tolist()
