"""Lightning DataModule over the split arrays: whole splits live in tensors.

Batches are tensor slices of a per-epoch permutation, not per-sample
``Dataset.__getitem__`` calls through a default DataLoader (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from fitscope.data import read_manifest
from fitscope.errors import FitscopeError
from fitscope.fileio import sha256_file
from fitscope.scoring import split_tensors


class TensorBatches:
    """Iterate over ``(x, y)`` in batches; reshuffled every epoch when ``shuffle``."""

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        augment_shift: int = 0,
        generator: torch.Generator | None = None,
    ) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.shuffle, self.augment_shift = shuffle, augment_shift
        self.generator = generator or torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x, y = self.x, self.y
        if self.shuffle:
            order = torch.randperm(len(y), generator=self.generator)
            x, y = x[order], y[order]
        if self.augment_shift:
            x = shift_images(x, self.augment_shift, self.generator)
        for start in range(0, len(y), self.batch_size):
            yield x[start : start + self.batch_size], y[start : start + self.batch_size]


def shift_images(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each flattened 28x28 image by up to ``max_shift`` pixels (zero fill)."""
    n = len(x)
    images = x.view(n, 28, 28)
    pad = torch.nn.functional.pad(images, (max_shift,) * 4)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(28)[None, :])[:, :, None]  # (n, 28, 1)
    cols = (dx[:, None] + torch.arange(28)[None, :])[:, None, :]  # (n, 1, 28)
    shifted = pad[torch.arange(n)[:, None, None], rows, cols]
    return shifted.reshape(n, -1)


class ArrayDataModule(pl.LightningDataModule):
    """Train/val/test splits of one dataset written by the DVC split stage."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        task: str,
        batch_size: int,
        train_size: int | None = None,
        augment_shift: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.task, self.batch_size, self.train_size = task, batch_size, train_size
        self.augment_shift, self.seed = augment_shift, seed
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # Shuffling and augmentation draw from this generator; it is saved in Lightning
        # checkpoints (state_dict below), so a resumed run sees the same batches.
        self.generator = torch.Generator().manual_seed(seed)

    def __getstate__(self) -> dict[str, Any]:
        # DDP workers (ddp_spawn) receive a pickled copy: they load the splits themselves in
        # setup() rather than receive them through shared memory, which failed here
        # ("unable to resize file") and would copy a full-scale dataset per worker.
        state = self.__dict__.copy()
        state["tensors"] = {}
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.generator.set_state(state_dict["generator"])

    @property
    def manifest_path(self) -> Path:
        return self.data_dir / "manifest.json"

    def manifest(self) -> dict[str, Any]:
        return read_manifest(self.data_dir)

    def manifest_sha256(self) -> str:
        return sha256_file(self.manifest_path)

    def setup(self, stage: str | None = None) -> None:
        """Load and verify every split (a bad file is a one-line error before any run exists)."""
        if self.tensors:
            return
        for split in ("train", "val", "test"):
            self.tensors[split] = split_tensors(self.data_dir, split, self.task, self.train_size)
        n_train = len(self.tensors["train"][1])
        if self.batch_size > n_train:
            raise FitscopeError(
                f"data.batch_size={self.batch_size} is larger than the {n_train} training rows. "
                "Fix: lower data.batch_size"
            )

    def _batches(self, split: str, *, train: bool = False) -> TensorBatches:
        x, y = self.tensors[split]
        return TensorBatches(
            x,
            y,
            self.batch_size,
            shuffle=train,
            augment_shift=self.augment_shift if train else 0,
            generator=self.generator,
        )

    def train_dataloader(self) -> TensorBatches:
        return self._batches("train", train=True)

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test")

    @property
    def num_features(self) -> int:
        return int(self.tensors["train"][0].shape[1])
