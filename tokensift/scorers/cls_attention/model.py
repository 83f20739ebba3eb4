"""EViT / FasterVLM: keep the tokens the [CLS] token attends to most at the site's block.

Attention probabilities are computed eagerly at that one block only; every other block keeps its
kernel. A backbone without [CLS] (SigLIP) scores each token by the attention it *receives*, averaged
over the live queries, the usual substitute.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class ClsAttentionConfig(MethodConfig):
    pass


@register
class ClsAttentionMethod(TokenMethod):
    name = "cls_attention"
    config_class = ClsAttentionConfig
    needs_attention = True
    description = "keep the tokens [CLS] attends to most (EViT); attention received when there is no [CLS]"

    def score(self, state: TokenState) -> Tensor:
        attention = state.attention.float().mean(dim=1)  # [B, N(query), N(key)], averaged over heads
        cls_rows = state.protected & (state.orig_index == 0)
        if state.num_prefix > 0 and bool(cls_rows.any(dim=1).all()):
            return (attention * cls_rows.float().unsqueeze(-1)).sum(dim=1)
        queries = state.alive.float().unsqueeze(-1)
        return (attention * queries).sum(dim=1) / queries.sum(dim=1).clamp_min(1.0)

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``) beyond the captured map (charged by the bench for
        ``needs_attention``): its head average, ``H n²``, and the [CLS] row (or the mean over queries) taken as a
        weighted sum over the queries, ``2 n²``."""
        n = site.tokens
        return float(site.heads * n * n + 2 * n * n)
