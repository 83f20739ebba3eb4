"""What the tokensift data modules share: split datasets built in ``setup`` and three loaders with the same options."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


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
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
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
