"""The metrics.json contract: the key names a training run writes and the evaluate stage,
the report and the summary read.
"""

from __future__ import annotations


def metrics_file_key(key: str) -> str:
    """The metrics.json name of an MLflow summary key: ``fit/best_epoch`` -> ``best_epoch``,
    ``model/n_params`` -> ``n_params``, ``data/train_rows`` -> ``train_rows``,
    ``best/val/loss`` -> ``best_val_loss``."""
    group, _, rest = key.partition("/")
    return rest if group in ("fit", "model", "data") else key.replace("/", "_")


# The per-seed keys of a run's metrics.json that this stage averages (train._fit writes them).
SCORE_KEYS = (
    "test_loss",
    "test_acc",
    "test_auroc",
    "train_eval_loss",
    "test_ece",  # expected calibration error (model.metrics.calibration_error)
    "last_epoch_test_loss",  # the last trained epoch's weights: what early stopping bought
)
