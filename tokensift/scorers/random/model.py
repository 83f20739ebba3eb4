"""Uniformly random survivors: the baseline every scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.registry import register
from tokensift.state import SampleCounter, TokenState, with_sample_index


@dataclass
class RandomConfig(MethodConfig):
    """``seed``: each sample's draw is a function of (seed, sample, site), so a run repeats exactly; ``None``
    draws from torch's global generator instead.

    Samples are told apart by ``TokenState.sample_index`` (the dataset index a handle was given with
    ``handle.set_samples``, else the handle's running count of rows), never by their row in the batch:
    every sample of a test set gets its own draw, the same at any batch size.
    """

    seed: int | None = 0

    def __post_init__(self) -> None:
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(
                f"seed must be a non-negative integer or None (torch's global generator), got {self.seed!r}."
            )


@register
class RandomMethod(TokenMethod):
    name = "random"
    config_class = RandomConfig
    description = "keep a uniformly random subset of tokens"
    site_kinds = ("vit", "pre_llm", "llm")

    def __init__(self, config: RandomConfig | None = None):
        super().__init__(config)
        self._samples = SampleCounter()  # for states that come without a sample index (a packed tower's images)

    def score(self, state: TokenState) -> Tensor:
        if self.config.seed is None:
            return torch.rand(state.hidden.shape[:2]).to(state.hidden.device)
        return with_sample_index(state, self._samples).uniform(self.config.seed, stream=self.name)
