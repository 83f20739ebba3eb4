"""Test-only pieces for comparing runs across world sizes (used by tests/test_scale_out.py).

DynamicViT's Gumbel noise is a function of (seed, sample index, step): each sample draws the same noise
whichever rank holds it and however the global batch is split (the trainer passes ``batch["index"]`` to
the handle). What remains is dealing the training samples alike for any world size, so that one step of
W ranks covers the samples of one single-process step of W times the batch.
"""

from __future__ import annotations

import json
import os

from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, DistributedSampler

from tokensift.data import ClutteredDigitsDataModule, DigitVQADataModule, VideoDigitVQADataModule


class DistributedOrderDigits(ClutteredDigitsDataModule):
    """Training batches in the order Lightning's DistributedSampler deals them, for one process too.

    Under DDP Lightning always shuffles training data with ``DistributedSampler(seed=PL_GLOBAL_SEED)``:
    rank ``r`` of ``W`` gets ``perm[r::W]``. Giving that sampler explicitly (Lightning keeps it) makes
    one step of W ranks cover exactly the samples of one single-process step of W times the batch.
    """

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(
            self.train_dataset,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
            shuffle=True,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler)


class DistributedOrderVQA:
    """A VQA data module's training batches dealt as ``DistributedOrderDigits`` deals cluttered digits (a mixin)."""

    def train_dataloader(self) -> DataLoader:
        sampler = DistributedSampler(
            self.train_dataset,
            num_replicas=self.trainer.world_size,
            rank=self.trainer.global_rank,
            shuffle=True,
            seed=int(os.environ.get("PL_GLOBAL_SEED", 0)),
        )
        return DataLoader(self.train_dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate_fn)


class DistributedOrderDigitVQA(DistributedOrderVQA, DigitVQADataModule):
    """Digit VQA for the multimodal trainer's DDP test."""


class DistributedOrderVideoDigitVQA(DistributedOrderVQA, VideoDigitVQADataModule):
    """Video digit VQA for STTS's DDP test."""


class RecordRewardStatistics(Callback):
    """After every GRPO step, each rank appends its own rewards and the std that scaled its advantages to
    ``<out_dir>/rank<r>.jsonl`` (the cacovid scale-out test compares the ranks)."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        record = {
            "step": trainer.global_step,
            "rewards": pl_module.last_rewards.tolist(),
            "std": pl_module.last_reward_std.tolist(),
        }
        os.makedirs(self.out_dir, exist_ok=True)
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
