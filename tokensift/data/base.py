"""What the tokensift data modules share: split datasets built in ``setup`` and three loaders with the same options."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


def check_loader_args(
    batch_size: object,
    num_workers: object,
    train_samples: object,
    val_samples: object,
    test_samples: object,
    is_integer: Callable[[object], bool],
) -> None:
    """Raise ``ValueError`` unless the batch size, worker count and split sizes are integers in range."""
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("train_samples", train_samples, 1),
        ("val_samples", val_samples, 1),
        ("test_samples", test_samples, 1),
    ):
        if not is_integer(value) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class SeededSplitDataset(Dataset):
    """A split whose sample ``index`` is a pure function of ``(seed, split, index)``: subclasses set ``num_samples``,
    ``split``, ``split_id`` and ``seed`` and draw each sample from :meth:`rng`."""

    num_samples: int
    split: str
    split_id: int
    seed: int

    def __len__(self) -> int:
        return self.num_samples

    def _check_index(self, index: int) -> int:
        index = int(index)
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.num_samples}")
        return index

    def rng(self, index: int) -> np.random.Generator:
        """The generator sample ``index`` is drawn from: ``default_rng([seed, split_id, index])``."""
        return np.random.default_rng([self.seed, self.split_id, self._check_index(index)])


class EpochShuffle(RandomSampler):
    """The train split's order: a permutation that is a function of ``(seed, epoch)`` only.

    Lightning calls ``set_epoch`` before each epoch; ``resume(epoch, skip)`` makes the next pass start ``skip``
    samples into that epoch's permutation (a mid-epoch resume), without rendering the skipped samples.
    A ``RandomSampler``, so a distributed run still swaps it for Lightning's ``DistributedSampler``.
    """

    def __init__(self, data_source: Dataset, seed: int):
        super().__init__(data_source)
        self.seed = int(seed)
        self.epoch = 0
        self._skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume(self, epoch: int, skip: int) -> None:
        self.epoch, self._skip = int(epoch), int(skip)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator)[self._skip :]
        self._skip = 0
        yield from order.tolist()


class ResumableLoader(DataLoader):
    """The train loader: Lightning saves its ``state_dict`` (epoch, batches handed out) in every checkpoint and a
    resumed fit continues the interrupted epoch with the next batch of the same order, not from its start.
    """

    _taken = 0

    def __iter__(self):
        sampler = self.sampler
        self._taken = sampler._skip // self.batch_size if isinstance(sampler, EpochShuffle) else 0
        for batch in super().__iter__():
            self._taken += 1
            yield batch

    def state_dict(self) -> dict:
        epoch = self.sampler.epoch if isinstance(self.sampler, EpochShuffle) else None
        return {"epoch": epoch, "batches": self._taken}

    def load_state_dict(self, state: dict) -> None:
        if isinstance(self.sampler, EpochShuffle) and state.get("epoch") is not None:
            batches = int(state["batches"])
            self.sampler.resume(state["epoch"], 0 if batches >= len(self) else batches * self.batch_size)
        elif state.get("batches"):
            warnings.warn(
                f"resuming mid-epoch with a {type(self.sampler).__name__} (a distributed run): the interrupted "
                "epoch's data order is not restored, so the resumed run differs from an uninterrupted one.",
                stacklevel=2,
            )


class SplitDataModule(L.LightningDataModule):
    """A data module with train / val / test datasets built by ``_build(split)`` in ``setup``.

    Subclasses call :meth:`_init_splits` from ``__init__`` and implement ``_build``; ``_collate`` gives the
    loaders' ``collate_fn`` (``None``: torch's default). The test split also serves ``predict``.
    """

    def _init_splits(
        self,
        batch_size: int,
        num_workers: int,
        pin_memory: bool,
        seed: int,
        train_samples: int,
        val_samples: int,
        test_samples: int,
    ) -> None:
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self._num_samples = {"train": train_samples, "val": val_samples, "test": test_samples}
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def _build(self, split: str) -> Dataset:
        raise NotImplementedError

    def _collate(self) -> Callable | None:
        return None

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage`` (all three when ``stage`` is None)."""
        if stage in (None, "fit") and self.train_dataset is None:
            self.train_dataset = self._build("train")
        if stage in (None, "fit", "validate") and self.val_dataset is None:
            self.val_dataset = self._build("val")
        if stage in (None, "test", "predict") and self.test_dataset is None:
            self.test_dataset = self._build("test")

    def _loader(self, dataset: Dataset | None, name: str, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{name} is not built; call setup() first")
        # every loader has its own generator: iterating one never draws from torch's global generator
        generator = torch.Generator().manual_seed(self.seed)
        return (ResumableLoader if shuffle else DataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=EpochShuffle(dataset, self.seed) if shuffle else None,
            generator=generator,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, "train_dataset", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, "val_dataset", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test_dataset", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, "test_dataset", shuffle=False)
