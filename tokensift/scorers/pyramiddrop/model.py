"""PyramidDrop: prune visual tokens in stages through the LLM, each stage keeping a fraction of the last.

The LLM is split into stages (four in the paper: three boundaries at 1/4, 1/2 and 3/4 depth); at each
boundary the visual tokens are ranked by the attention the last instruction token pays them at the layer
before, and a fixed ratio λ of them survives. With ``keep_ratio=ρ`` over S boundaries the budget's
geometric schedule keeps ρ^(s/S) after boundary s, i.e. λ = ρ^(1/S) per stage, as PyramidDrop's
constant per-stage ratio. A per-site ``keep_ratio`` mapping sets each stage explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import last_text_attention
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
    needs_attention = True
    site_kinds = ("llm",)
    description = "drop visual tokens in stages through the LLM by last-instruction-token attention (PyramidDrop)"

    def default_mllm_sites(self, adapter) -> list[str]:
        return adapter.spread_llm_sites(self.config.num_stages)

    def score(self, state: TokenState) -> Tensor:
        return last_text_attention(state, self.name)
