"""D2Pruner: debiased attention picks pivots, then a maximal independent set on a spatial + semantic graph.

1. Importance is the attention the last text token pays each visual token at layer K-1, *debiased*:
   an LLM's attention grows towards the end of the sequence (recency / positional bias), which favours
   the lower rows of an image whatever they show. We fit that trend (a least-squares line of log
   attention against sequence position, per sample) and rank tokens by what it does not explain.
2. The most important tokens are kept as pivots (``pivot_fraction`` of the budget).
3. The other tokens form a graph whose edges join spatial neighbours (same image and frame, within
   ``spatial_radius`` in the token grid) and semantically similar tokens (cosine of hidden states above
   ``similarity_threshold``). Going down the importance ranking, a token is kept when none of its
   neighbours is kept yet (pivots included): a greedy maximal independent set, important and spread out.
   When the set is exhausted before the budget is, another round runs on the tokens left.

The published description gives the structure above, not the exact bias model or graph constants; those
are our choices, exposed as options.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import cosine_similarity_matrix, last_text_attention, require
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class D2PrunerConfig(MethodConfig):
    """``layer``: K (default site ``llm.<layer>``); the other options shape pivots and the token graph."""

    layer: int = 2
    pivot_fraction: float = 0.5
    spatial_radius: int = 1
    similarity_threshold: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.pivot_fraction) <= 1.0:
            raise ValueError(f"pivot_fraction must be in [0, 1], got {self.pivot_fraction!r}.")
        if isinstance(self.spatial_radius, bool) or not isinstance(self.spatial_radius, int) or self.spatial_radius < 0:
            raise ValueError(f"spatial_radius must be a non-negative integer, got {self.spatial_radius!r}.")
        if not -1.0 <= float(self.similarity_threshold) <= 1.0:
            raise ValueError(f"similarity_threshold must be a cosine in [-1, 1], got {self.similarity_threshold!r}.")


def debiased_importance(attention: Tensor, positions: Tensor) -> Tensor:
    """``log attention`` minus its least-squares linear trend over ``positions`` (both ``[N]``)."""
    log_attention = attention.float().clamp_min(1e-12).log()
    x = positions.float() - positions.float().mean()
    slope = (x * (log_attention - log_attention.mean())).sum() / (x * x).sum().clamp_min(1e-12)
    return log_attention - slope * x


def greedy_independent_sets(order: Tensor, adjacency: Tensor, selected: Tensor, count: int) -> Tensor:
    """Take ``count`` more of the nodes in ``order`` (best first): each round a greedy maximal independent set.

    ``adjacency`` is ``[n, n]`` bool; ``selected`` (``[n]`` bool, already kept) blocks its neighbours in the
    first round. Returns the updated ``selected``.
    """
    selected = selected.clone()
    blocked = (adjacency & selected.unsqueeze(0)).any(dim=1)
    while count > 0 and not bool(selected[order].all()):
        for node in order.tolist():
            if count == 0:
                break
            if selected[node] or blocked[node]:
                continue
            selected[node] = True
            blocked |= adjacency[node]
            count -= 1
        blocked = selected.clone()  # next round: only kept tokens are taken, their neighbours are free again
    return selected


@register
class D2PrunerMethod(TokenMethod):
    name = "d2pruner"
    config_class = D2PrunerConfig
    needs_attention = True
    site_kinds = ("llm",)
    description = "debiased-attention pivots + maximal independent set on a spatial/semantic graph (D2Pruner)"

    def default_mllm_sites(self, adapter) -> list[str]:
        return [f"llm.{self.config.layer}"]

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        attention = last_text_attention(state, self.name)
        coords = require(state, "coords", self.name)
        image_id = require(state, "image_id", self.name)
        keep = state.protected & state.alive
        radius = self.config.spatial_radius
        for b in range(keep.shape[0]):
            visual = state.prunable[b].nonzero().squeeze(1)
            budget = min(int(num_keep[b]), visual.numel())
            if budget == 0:
                continue
            importance = debiased_importance(attention[b, visual], state.orig_index[b, visual])
            order = importance.argsort(descending=True, stable=True)
            pivots = torch.zeros(visual.numel(), dtype=torch.bool, device=visual.device)
            pivots[order[: round(budget * self.config.pivot_fraction)]] = True
            where = coords[b, visual]  # [n, 3] (t, h, w)
            same_frame = (image_id[b, visual].unsqueeze(1) == image_id[b, visual].unsqueeze(0)) & (
                where[:, None, 0] == where[None, :, 0]
            )
            near = (where[:, None, 1:] - where[None, :, 1:]).abs().amax(dim=-1) <= radius
            similar = cosine_similarity_matrix(state.hidden[b, visual]) > self.config.similarity_threshold
            adjacency = (same_frame & near) | similar
            adjacency.fill_diagonal_(False)
            chosen = greedy_independent_sets(order, adjacency, pivots, budget - int(pivots.sum()))
            keep[b, visual[chosen]] = True
        return keep

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``) beyond the captured map of layer K-1 (charged by
        the bench for ``needs_attention``): the last text token's row averaged over heads, ``H n``, and, when the
        sample keeps any visual token, the semantic graph's cosine similarities of its ``v`` visual hidden states,
        ``3 v d + 2 v² d`` (the debiasing line and the spatial graph are O(v) / integer work)."""
        row = float(site.heads * site.tokens)
        if min(site.keep, site.prunable) == 0:
            return row
        return row + site.cosine_matrix(site.prunable, site.hidden)
