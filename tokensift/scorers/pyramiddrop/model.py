"""PyramidDrop: prune visual tokens in stages through the LLM, each stage keeping a fraction of the last.

The LLM is split into stages (four in the paper: three boundaries at 1/4, 1/2 and 3/4 depth); at each
boundary K the visual tokens are ranked by the attention the last instruction token pays them in layer K
itself: PyramidDrop's ``pdrop_rank_drop`` runs layer K's ``input_layernorm``, ``q_proj`` and ``k_proj``
(+ RoPE) on the input of layer K and takes the softmax of that one query row, averaged over heads (FastV,
by contrast, reads layer K-1's attention). The handle computes just that row (``needs_query_attention``),
so no layer's attention kernel is replaced. A fixed ratio λ of the visual tokens survives each boundary.
With ``keep_ratio=ρ`` over S boundaries the budget's geometric schedule keeps ρ^(s/S) after boundary s,
i.e. λ = ρ^(1/S) per stage, as PyramidDrop's constant per-stage ratio. A per-site ``keep_ratio`` mapping
sets each stage explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class PyramidDropConfig(MethodConfig):
    """``num_stages``: stage boundaries spread evenly over the LLM's depth (used when ``sites`` is not given)."""

    num_stages: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.num_stages, bool) or not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages must be a positive integer, got {self.num_stages!r}.")


@register
class PyramidDropMethod(TokenMethod):
    name = "pyramiddrop"
    config_class = PyramidDropConfig
    needs_query_attention = True
    site_kinds = ("llm",)
    description = "drop visual tokens in stages through the LLM by last-instruction-token attention (PyramidDrop)"

    def default_mllm_sites(self, adapter) -> list[str]:
        return adapter.spread_llm_sites(self.config.num_stages)

    def score(self, state: TokenState) -> Tensor:
        return require(state, "query_attention", self.name).float().mean(dim=1)  # [B, N], mean over heads

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``) beyond the handle's last-query row of layer K
        (charged by the bench for ``needs_query_attention``: input norm, keys, one query, RoPE, one softmax row):
        the mean over heads, ``H n``."""
        return float(site.heads * site.tokens)
