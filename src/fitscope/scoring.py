"""Losses, metrics and split tensors with torch alone (no Lightning, no torchmetrics).

Training, the test scoring after it and the benchmark share these. They stay free of
Lightning and torchmetrics, whose imports cost seconds (torchmetrics pulls in scipy): a
process that only scores or reports must not pay them (docs/pipeline.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fitscope.data import load_split, read_manifest
from fitscope.errors import FitscopeError


def data_loss(task: str, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean BCE-with-logits (binary) or cross-entropy (multiclass), without any penalty."""
    if task == "binary":
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), targets)
    return F.cross_entropy(logits, targets)


def binary_auroc(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Exact ROC AUC: the Mann-Whitney statistic with tied scores counted as half.

    Equal to torchmetrics' ``binary_auroc(thresholds=None)`` (tests/test_training.py); 0.0
    when one class is absent, as torchmetrics returns.
    """
    positive = targets.bool()
    n_pos = int(positive.sum())
    n_neg = len(targets) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 0.0
    values, order = torch.sort(probs.double())
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    # The average 1-based rank of each group of tied scores.
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@torch.no_grad()
def classification_metrics(
    task: str, logits: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Loss, accuracy (and AUROC for binary), computed on probabilities.

    Binary accuracy counts a probability above 0.5 as positive (torchmetrics' rule; Keras'
    ``accuracy`` on a logit output thresholds the logit instead, a quirk not reproduced).
    """
    loss = data_loss(task, logits, targets).item()
    if task == "binary":
        probs = torch.sigmoid(logits.squeeze(-1))
        hits = (probs > 0.5).long() == targets.long()
        return {
            "loss": loss,
            "acc": hits.double().mean().item(),
            "auroc": binary_auroc(probs, targets),
        }
    del num_classes  # accuracy needs no class count; kept for one call signature
    return {"loss": loss, "acc": (logits.argmax(-1) == targets).double().mean().item()}


@torch.no_grad()
def per_class_accuracy(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> dict[str, float]:
    """Accuracy within each true class (``acc_class_<k>``); a class not present is left out."""
    hits = logits.argmax(-1) == targets
    return {
        f"acc_class_{k}": hits[targets == k].double().mean().item()
        for k in range(num_classes)
        if bool((targets == k).any())
    }


def split_tensors(
    data_dir: str | Path,
    split: str,
    task: str,
    train_size: int | None = None,
    *,
    mapped: bool = False,
) -> Any:
    """One split as float32 features and float (binary) or long (multiclass) targets.

    The arrays are verified against the split's manifest first (``data.load_split``).
    ``train_size`` keeps the first rows of the training split (other splits are whole).
    ``mapped``: return the verified memory-mapped arrays instead of tensors (nothing loaded).
    """
    x, y = load_split(data_dir, split)
    manifest = read_manifest(data_dir)
    if task == "binary" and manifest["num_classes"] != 2:
        # BCE would silently take labels 2..9 as targets.
        raise FitscopeError(
            f"data.task=binary needs labels 0/1, but {data_dir} holds {manifest['dataset']} "
            f"({manifest['num_classes']} classes). Fix: use the data config of that dataset "
            f"(data={manifest['dataset']}) or point data.dir at a binary split"
        )
    if split == "train" and train_size is not None:
        if train_size > len(y):
            raise FitscopeError(
                f"data.train_size={train_size} but the training split has "
                f"{len(y)} rows. Fix: lower data.train_size or enlarge the split"
            )
        x, y = x[:train_size], y[:train_size]
    if mapped:
        return x, y
    return torch.from_numpy(np.array(x, dtype=np.float32)), targets_tensor(y, task)


SCORE_ROWS = 65_536  # rows per forward pass: 10.5M full-HIGGS rows at once need GBs


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
def test_scores(
    model: torch.nn.Module,
    task: str,
    num_classes: int,
    test: tuple[Any, Any],
    train: tuple[Any, Any],
) -> dict[str, float]:
    """The held-out test metrics of a trained model (eval mode), per-class accuracies for
    multiclass, and its training loss in eval mode (``train_eval_loss``).

    Each split is tensors or memory-mapped arrays (the full HIGGS training split), scored
    in slices. The training loss logged during training has dropout active (as in
    Keras); the eval-mode one is what "how well does the model fit its training data" means.
    """
    model = model.eval()
    logits, y = _forward(model, test[0]), targets_tensor(test[1], task)
    result = classification_metrics(task, logits, y, num_classes)
    if task == "multiclass":
        result.update(per_class_accuracy(logits, y, num_classes))
    train_logits = _forward(model, train[0])
    result["train_eval_loss"] = data_loss(task, train_logits, targets_tensor(train[1], task)).item()
    return result
