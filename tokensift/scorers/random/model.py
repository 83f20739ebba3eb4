"""Uniformly random survivors: the baseline every scorer must beat."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class RandomConfig(MethodConfig):
    """``seed``: draws repeat across forward passes when set (a fair, reproducible baseline)."""

    seed: int | None = 0


@register
class RandomMethod(TokenMethod):
    name = "random"
    config_class = RandomConfig
    description = "keep a uniformly random subset of tokens"
    site_kinds = ("vit", "pre_llm", "llm")

    def score(self, state: TokenState) -> Tensor:
        generator = None
        if self.config.seed is not None:
            generator = torch.Generator().manual_seed(self.config.seed)
        scores = torch.rand(state.hidden.shape[:2], generator=generator)
        return scores.to(state.hidden.device)
