"""Lightning module behaviour: metrics, early stopping and restoring the best weights."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import REPO
from pytorch_lightning.callbacks import EarlyStopping
from torchmetrics.classification import BinaryAUROC

from fitscope.model.metrics import classification_metrics, per_class_accuracy
from fitscope.model.mlp import build_mlp
from fitscope.training.callbacks import EpochHistory, RestoreBestWeights
from fitscope.training.datamodule import ArrayDataModule, TensorBatches, shift_images
from fitscope.training.module import FitModule
from fitscope.training.trainer import build_trainer

logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)


class Snapshots(pl.Callback):
    """Test probe: the weights at the end of every epoch."""

    def __init__(self) -> None:
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def on_validation_end(self, trainer, pl_module) -> None:
        self.states[trainer.current_epoch] = copy.deepcopy(pl_module.state_dict())


def fit(dm, *, epochs, lr, patience=None, width=64, depth=2, scheduler=None):
    torch.manual_seed(0)
    module = FitModule(
        build_mlp(28, 1, width=width, depth=depth),
        task="binary",
        num_classes=2,
        optimizer={"name": "adam", "lr": lr, "eps": 1e-7},
        scheduler=scheduler or {"name": "none"},
        steps_per_epoch=len(dm.train_dataloader()),
    )
    history, restore, snaps = EpochHistory(), RestoreBestWeights(), Snapshots()
    callbacks = [history, snaps, restore]
    if patience:
        callbacks.append(EarlyStopping(monitor="val/loss", patience=patience, check_finite=False))
    trainer = build_trainer(callbacks, max_epochs=epochs)
    trainer.fit(module, datamodule=dm)
    return module, history, restore, snaps


@pytest.fixture(scope="module")
def small_higgs(processed_dir):
    # 2,000 training rows make the 64x2 model overfit within a few epochs at lr 0.01.
    dm = ArrayDataModule(processed_dir / "higgs", task="binary", batch_size=500, train_size=2000)
    dm.setup()
    return dm


def test_restore_best_weights_loads_the_best_epoch(small_higgs):
    module, history, restore, snaps = fit(small_higgs, epochs=12, lr=0.01)
    val = [row["val/loss"] for row in history.rows]
    best = min(range(len(val)), key=val.__getitem__)
    assert restore.best_epoch == best
    assert best < len(val) - 1, "the setting must overfit so that best != last"
    now = module.state_dict()
    for key, tensor in snaps.states[best].items():
        torch.testing.assert_close(now[key], tensor)
    assert not torch.equal(now["model.0.weight"], snaps.states[len(val) - 1]["model.0.weight"])
    # The last epoch's weights are set aside (what early stopping bought is scored on them).
    for key, tensor in snaps.states[len(val) - 1].items():
        torch.testing.assert_close(restore.last_state[key], tensor)


def test_the_calibration_error_is_torchmetrics_expected_calibration_error():
    """Two predictions at 0.9 (one right), two at 0.2 (both negatives): bins of 15 put
    each pair in its own bin; |0.9 - 0.5| x 2/4 + |0.2 - 0| x 2/4 = 0.3."""
    from fitscope.model.metrics import calibration_error

    probs = torch.tensor([0.9, 0.9, 0.2, 0.2])
    logits = torch.log(probs / (1 - probs))[:, None]
    labels = torch.tensor([1.0, 0.0, 0.0, 0.0])
    assert calibration_error("binary", logits, labels, 2) == pytest.approx(0.3, abs=1e-6)
    perfect = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])  # confident and right
    assert calibration_error("multiclass", perfect, torch.tensor([0, 1]), 2) < 1e-4


def test_early_stopping_stops_after_patience(small_higgs):
    _, history, restore, _ = fit(small_higgs, epochs=200, lr=0.01, patience=3)
    epochs = len(history.rows)
    assert epochs < 200
    assert epochs - 1 - restore.best_epoch == 3  # stopped 3 epochs after the best one


def test_history_rows_hold_train_and_val_metrics(small_higgs):
    _, history, _, _ = fit(small_higgs, epochs=2, lr=1e-3, width=8, depth=1)
    assert [r["epoch"] for r in history.rows] == [0, 1]
    row = history.rows[-1]
    for key in (
        "train/loss",
        "train/acc",
        "train/auroc",
        "val/loss",
        "val/acc",
        "val/auroc",
        "optimizer/lr",
    ):
        assert math.isfinite(row[key]), key
    assert "train/l2_penalty" not in row  # no L2: no all-zero series


def test_every_batch_is_one_counted_optimizer_step_of_the_inverse_time_schedule(small_higgs):
    schedule = {"name": "inverse_time", "decay_epochs": 2}
    module, history, _, _ = fit(
        small_higgs, epochs=3, lr=1e-3, width=8, depth=1, scheduler=schedule
    )
    steps = len(small_higgs.train_dataloader())
    assert module.trainer.global_step == 3 * steps  # Lightning sees every optimizer step
    # The lr recorded after epoch e has been decayed by (e + 1) * steps scheduler steps.
    for row in history.rows:
        done = (row["epoch"] + 1) * steps
        assert row["optimizer/lr"] == pytest.approx(1e-3 / (1 + done / (2 * steps)))


def test_metrics_use_probabilities_not_logits():
    # Small logits all inside [0, 1]: read as probabilities, thresholding at 0.5 would give
    # predictions [0, 1, 0, 0] and accuracy 0.75. As logits every probability is >= 0.5,
    # so every prediction is 1 and the accuracy is the positive rate, 0.5.
    logits = torch.tensor([[0.1], [0.9], [0.3], [0.2]])
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0])
    m = classification_metrics("binary", logits, targets, 2)
    assert m["acc"] == pytest.approx(0.5)
    assert m["auroc"] == pytest.approx(
        BinaryAUROC()(torch.sigmoid(logits[:, 0]), targets.long()).item()
    )
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], targets)
    assert m["loss"] == pytest.approx(expected.item())


def mann_whitney_auroc(probs: torch.Tensor, targets: torch.Tensor) -> float:
    """Exact ROC AUC as fitscope computed it by hand before torchmetrics scored it: the
    Mann-Whitney statistic with tied scores counted as half (the reference here)."""
    positive = targets.bool()
    n_pos = int(positive.sum())
    n_neg = len(targets) - n_pos
    values, order = torch.sort(probs.double())
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    mean_rank = torch.cumsum(counts, 0).double() - (counts.double() - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = mean_rank[inverse]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torchmetrics_scores_equal_the_hand_written_figures(seed):
    """The metrics come from torchmetrics now; on random data with many tied scores (and
    logit 0) they equal what the hand-written formulas gave, within float tolerance."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (500, 1), generator=g).float() / 2  # ties, and logit 0
    targets = torch.randint(0, 2, (500,), generator=g).float()
    m = classification_metrics("binary", logits, targets, 2)
    probs = torch.sigmoid(logits[:, 0])
    hand_acc = ((probs > 0.5).long() == targets.long()).double().mean().item()
    assert m["acc"] == pytest.approx(hand_acc, abs=1e-7)
    auroc = mann_whitney_auroc(probs, targets)
    assert m["auroc"] == pytest.approx(auroc, abs=1e-6) and 0.3 < auroc < 0.7
    logits10 = torch.randn(400, 10, generator=g)
    labels = torch.randint(0, 10, (400,), generator=g)
    m10 = classification_metrics("multiclass", logits10, labels, 10)
    hits = logits10.argmax(-1) == labels
    assert m10["acc"] == pytest.approx(hits.double().mean().item(), abs=1e-7)
    got = per_class_accuracy(logits10, labels, 10)
    for k in range(10):
        assert got[f"acc_class_{k}"] == pytest.approx(hits[labels == k].double().mean().item())
    # A class absent from the targets is left out, not reported as 0.
    assert "acc_class_3" not in per_class_accuracy(logits10[labels != 3], labels[labels != 3], 10)


def test_no_metric_is_hand_written_where_torchmetrics_has_it():
    """Accuracy and AUROC are torchmetrics' (the loss is the training objective itself)."""
    source = (REPO / "src" / "fitscope" / "model" / "metrics.py").read_text()
    for name in (
        "binary_accuracy",
        "binary_auroc",
        "multiclass_accuracy",
        "binary_calibration_error",
        "multiclass_calibration_error",
    ):
        assert f"{name}(" in source
    assert "unique_consecutive" not in source and ".argmax(" not in source


def test_tensor_batches_cover_every_row_once_per_epoch():
    x = torch.arange(1050, dtype=torch.float32)[:, None]
    y = torch.arange(1050, dtype=torch.float32)
    batches = TensorBatches(x, y, 500, shuffle=True, seed=1)
    assert len(batches) == 3
    for _ in range(2):
        seen = torch.cat([b[1] for b in batches])
        assert sorted(seen.tolist()) == list(range(1050))
        assert [len(b[1]) for b in batches] == [500, 500, 50]
    first, second = (torch.cat([b[1] for b in batches]) for _ in range(2))
    assert not torch.equal(first, second)  # reshuffled every epoch


def test_shift_images_moves_pixels_within_bounds():
    img = torch.zeros(1, 28, 28)
    img[0, 14, 14] = 1.0
    gen = torch.Generator().manual_seed(0)
    shifted = shift_images(img.reshape(1, -1).repeat(50, 1), 2, gen).view(50, 28, 28)
    assert torch.all(shifted.sum(dim=(1, 2)) == 1.0)  # one pixel, moved, never lost
    pos = shifted.nonzero()[:, 1:]
    assert pos.min() >= 12 and pos.max() <= 16
    assert len({tuple(p.tolist()) for p in pos}) > 1


def test_the_reliability_bins_add_up_to_torchmetrics_ece():
    """The reliability diagram's bins are the ECE's: their weighted gaps sum to it."""
    from fitscope.model.metrics import calibration_error, test_curves

    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    x, y = torch.randn(500, 5), (torch.rand(500) > 0.4).float()
    curves = test_curves(model, "binary", (x, y))
    header, *bins = curves["calibration"]
    assert header == ["bin_low", "bin_high", "confidence", "accuracy", "count"]
    assert sum(b[4] for b in bins) == 500
    gaps = sum(abs(b[2] - b[3]) * b[4] for b in bins) / 500
    assert gaps == pytest.approx(calibration_error("binary", model(x), y, 2), abs=1e-5)
    fpr, tpr = zip(*curves["roc"][1:], strict=True)
    assert fpr[0] == 0 and fpr[-1] == 1 and list(tpr) == sorted(tpr)
    assert curves["pr"][0] == ["recall", "precision"]


def test_saturated_predictions_get_torchmetrics_own_bin_and_long_curves_are_thinned():
    from fitscope.model.metrics import CURVE_POINTS, calibration_error, test_curves

    torch.manual_seed(1)
    x = torch.randn(3000, 1)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(30.0)  # many probabilities of exactly 1.0 in float32
    y = (torch.rand(3000) > 0.5).float()
    _, *bins = test_curves(model, "binary", (x, y))["calibration"]
    assert bins[-1][:2] == [1.0, 1.0] and bins[-1][4] > 0  # the 16th bin: confidence 1
    gaps = sum(abs(b[2] - b[3]) * b[4] for b in bins) / 3000
    assert gaps == pytest.approx(calibration_error("binary", model(x), y, 2), abs=1e-5)
    curves = test_curves(torch.nn.Linear(1, 1), "binary", (x, y))  # 3000 distinct scores
    assert len(curves["roc"]) - 1 <= CURVE_POINTS and curves["roc"][1] == [0.0, 0.0]
    assert curves["roc"][-1] == [1.0, 1.0]
