"""Test-only pieces for comparing runs across world sizes (used by tests/test_scale_out.py).

DynamicViT draws Gumbel noise per token, so how a global batch is split over ranks changes which tokens
each sample keeps: two ranks of 8 samples do not draw the noise one process of 16 draws. To compare the
weights that 1 and 2 processes reach, the comparison trains a noise-free variant (straight-through top-k
of the predictor's own logits) on training batches dealt alike for any world size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from tokensift.data import ClutteredDigitsDataModule
from tokensift.scorers.base import top_k_with_protected
from tokensift.scorers.dynamicvit import DynamicViTMethod
from tokensift.scorers.registry import _METHODS, register
from tokensift.state import TokenState

METHOD_NAME = "test_noise_free_dynamicvit"


class NoiseFreeDynamicViT(DynamicViTMethod):
    """DynamicViT's predictor with a deterministic training decision: top-k logits, straight-through sigmoid."""

    name = METHOD_NAME

    def keep_policy(self, state: TokenState, num_keep: int) -> Tensor:
        if not self.training:
            return super().keep_policy(state, num_keep)
        logits = self.score(state)
        index = top_k_with_protected(logits.detach().float(), state, num_keep)
        hard = torch.zeros_like(logits).scatter(1, index, 1.0)
        soft = torch.sigmoid(logits)
        decision = torch.where(state.protected, torch.ones_like(hard), hard - soft.detach() + soft)
        return decision if state.policy is None else decision * state.policy


@contextmanager
def noise_free_method_registered() -> Iterator[str]:
    """Register the test method for the block only, so other test modules never see it in ``ts.methods()``."""
    register(NoiseFreeDynamicViT)
    try:
        yield METHOD_NAME
    finally:
        _METHODS.pop(METHOD_NAME, None)


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
