"""FastV: after layer K-1, drop the visual tokens the last text token attends to least.

FastV observes that visual tokens receive little attention past the first layers; at layer K (K=2 in
the paper) it keeps the visual tokens with the highest attention from the last token at layer K-1,
averaged over heads. Attention is computed eagerly at that one layer; every other layer keeps its
kernel (SDPA, flash).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import last_text_attention
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class FastVConfig(MethodConfig):
    """``layer``: K, the decoder layer whose input is pruned (default site ``llm.<layer>``)."""

    layer: int = 2


@register
class FastVMethod(TokenMethod):
    name = "fastv"
    config_class = FastVConfig
    needs_attention = True
    site_kinds = ("llm",)
    description = "keep the visual tokens the last text token attends to most at LLM layer K-1 (FastV)"

    def default_mllm_sites(self, adapter) -> list[str]:
        return [f"llm.{self.config.layer}"]

    def score(self, state: TokenState) -> Tensor:
        return last_text_attention(state, self.name)

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``) beyond the captured map of layer K-1 (charged by
        the bench for ``needs_attention``): the last text token's row averaged over heads, ``H n``."""
        return float(site.heads * site.tokens)
