"""Keep the tokens with the largest hidden-state norm: the cheapest content-aware baseline."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class L2NormConfig(MethodConfig):
    pass


@register
class L2NormMethod(TokenMethod):
    name = "l2norm"
    config_class = L2NormConfig
    description = "keep the tokens whose hidden states have the largest L2 norm"

    def score(self, state: TokenState) -> Tensor:
        return state.hidden.float().norm(dim=-1)

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``): every token's squared norm, ``2 n d``."""
        return 2.0 * site.tokens * site.hidden
