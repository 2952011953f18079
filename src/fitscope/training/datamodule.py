"""Lightning DataModule over the split arrays: whole splits live in tensors.

Batches are tensor slices of a per-epoch permutation, not per-sample
``Dataset.__getitem__`` calls through a default DataLoader (docs/benchmarks.md).
With ``data.chunk_rows`` (the full HIGGS file) the training split stays memory-mapped
and is read one shuffled chunk at a time (:class:`ChunkBatches`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from fitscope.core.errors import FitscopeError
from fitscope.core.fileio import sha256_file
from fitscope.data.splits import load_split, read_manifest
from fitscope.model.metrics import targets_tensor


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


class ChunkBatches:
    """Shuffled batches of a memory-mapped split, one chunk of rows in memory at a time.

    Every epoch draws (from ``generator``) a permutation of the chunks (consecutive runs of
    ``chunk_rows`` rows) and of the rows within each chunk; batches are cut from that
    stream, rows carried across chunk ends, so every row comes exactly once per epoch and
    only one chunk (plus a batch) is ever read into memory. With ``world_size`` > 1 (DDP),
    every rank draws the same order from the same seed and takes every ``world_size``-th
    batch, starting at its ``rank``; the batch count is padded to a multiple of
    ``world_size`` with the epoch's first batches (as DistributedSampler pads), so all ranks
    run the same number of steps.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        chunk_rows: int,
        *,
        binary: bool,
        generator: torch.Generator,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.x, self.y, self.batch_size, self.chunk_rows = x, y, batch_size, chunk_rows
        self.binary, self.generator = binary, generator
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        batches = -(-len(self.y) // self.batch_size)
        return -(-batches // self.world_size)

    def _targets(self, y: np.ndarray) -> torch.Tensor:
        return targets_tensor(y, "binary" if self.binary else "multiclass")

    def _global_batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The epoch's batches in the order every rank agrees on."""
        n = len(self.y)
        chunks = torch.randperm(-(-n // self.chunk_rows), generator=self.generator).tolist()
        carry_x = np.empty((0, self.x.shape[1]), dtype=np.float32)
        carry_y = np.empty(0, dtype=self.y.dtype)
        for chunk in chunks:
            start = chunk * self.chunk_rows
            stop = min(n, start + self.chunk_rows)
            order = torch.randperm(stop - start, generator=self.generator).numpy()
            # The one read of this chunk from the memory map, shuffled as it is copied.
            xs = np.concatenate([carry_x, np.asarray(self.x[start:stop], np.float32)[order]])
            ys = np.concatenate([carry_y, np.asarray(self.y[start:stop])[order]])
            full = len(ys) - len(ys) % self.batch_size
            for at in range(0, full, self.batch_size):
                yield xs[at : at + self.batch_size], ys[at : at + self.batch_size]
            carry_x, carry_y = xs[full:], ys[full:]
        if len(carry_y):
            yield carry_x, carry_y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        first: list[tuple[np.ndarray, np.ndarray]] = []  # kept to pad the last round
        count = 0
        for x, y in self._global_batches():
            if count < self.world_size - 1:
                first.append((x, y))
            if count % self.world_size == self.rank:
                yield torch.from_numpy(x), self._targets(y)
            count += 1
        for pad in range(-count % self.world_size):
            if (count + pad) % self.world_size == self.rank:
                x, y = first[pad % len(first)]
                yield torch.from_numpy(x), self._targets(y)


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
        chunk_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.data_dir = Path(data_dir)
        self.task, self.batch_size, self.train_size = task, batch_size, train_size
        self.augment_shift, self.seed, self.chunk_rows = augment_shift, seed, chunk_rows
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mapped: tuple[np.ndarray, np.ndarray] | None = None  # chunked training split
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

    def manifest_sha256(self) -> str:
        return sha256_file(self.manifest_path)

    def setup(self, stage: str | None = None) -> None:
        """Load and verify every split (a bad file is a one-line error before any run exists)."""
        if self.tensors:
            return
        chunked = self.chunk_rows is not None
        if chunked:
            if self.augment_shift:
                raise FitscopeError(
                    "data.chunk_rows streams tabular rows; image shifts need whole tensors. "
                    "Fix: set data.chunk_rows=null or regularization.augment_shift=0"
                )
            x, y = split_tensors(self.data_dir, "train", self.task, self.train_size, mapped=True)
            self.mapped = (x, y)
        for split in ("val", "test") if chunked else ("train", "val", "test"):
            self.tensors[split] = split_tensors(self.data_dir, split, self.task, self.train_size)
        n_train = len(self.mapped[1]) if self.mapped else len(self.tensors["train"][1])
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

    def train_dataloader(self) -> TensorBatches | ChunkBatches:
        if self.mapped is None:
            return self._batches("train", train=True)
        trainer = self.trainer  # None outside a Trainer (e.g. when counting steps)
        return ChunkBatches(
            *self.mapped,
            self.batch_size,
            int(self.chunk_rows or 0),
            binary=self.task == "binary",
            generator=self.generator,
            rank=trainer.global_rank if trainer else 0,
            world_size=trainer.world_size if trainer else 1,
        )

    def val_dataloader(self) -> TensorBatches:
        return self._batches("val")

    def test_dataloader(self) -> TensorBatches:
        return self._batches("test")

    @property
    def num_features(self) -> int:
        return int(self.mapped[0].shape[1] if self.mapped else self.tensors["train"][0].shape[1])
