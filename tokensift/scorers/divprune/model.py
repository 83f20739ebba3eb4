"""DivPrune: keep a maximally diverse subset (greedy max-min cosine distance), no scores needed.

The first pick is the token farthest from its nearest neighbour; each next pick maximises its
distance to the closest token already picked. Special tokens are kept and play no part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class DivPruneConfig(MethodConfig):
    pass


def max_min_diverse(features: Tensor, candidates: Tensor, num_keep: int) -> Tensor:
    """Greedy max-min diversity: ``[B, num_keep]`` indices among ``candidates`` ([B, N] bool)."""
    normed = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    distance = 1.0 - normed @ normed.transpose(1, 2)  # [B, N, N]
    b, n, _ = distance.shape
    ninf = torch.tensor(float("-inf"), device=features.device)
    others = ~torch.eye(n, dtype=torch.bool, device=features.device)
    pair_ok = candidates.unsqueeze(1) & candidates.unsqueeze(2) & others
    nearest = distance.masked_fill(~pair_ok, float("inf")).amin(dim=-1)  # distance to nearest other candidate
    first = torch.where(candidates, nearest, ninf).argmax(dim=-1)
    picks = [first]
    closest = distance.gather(1, first.view(b, 1, 1).expand(b, 1, n)).squeeze(1)  # min distance to picks
    chosen = torch.zeros_like(candidates)
    chosen[torch.arange(b), first] = True
    for _ in range(num_keep - 1):
        pick = torch.where(candidates & ~chosen, closest, ninf).argmax(dim=-1)
        picks.append(pick)
        chosen[torch.arange(b), pick] = True
        closest = torch.minimum(closest, distance.gather(1, pick.view(b, 1, 1).expand(b, 1, n)).squeeze(1))
    return torch.stack(picks, dim=1)


@register
class DivPruneMethod(TokenMethod):
    name = "divprune"
    config_class = DivPruneConfig
    description = "keep a maximally diverse subset (greedy max-min cosine distance, DivPrune)"
    site_kinds = ("vit", "pre_llm", "llm")

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        keep = state.protected & state.alive
        most = int(num_keep.max()) if num_keep.numel() else 0
        if most == 0:
            return keep
        picks = max_min_diverse(state.hidden, state.prunable, most)
        # the greedy picks are nested, so sample b's first num_keep[b] picks are its own max-min subset
        wanted = torch.arange(most, device=picks.device).unsqueeze(0) < num_keep.to(picks.device).unsqueeze(1)
        rows = torch.arange(picks.shape[0], device=picks.device).unsqueeze(1).expand_as(picks)
        keep[rows[wanted], picks[wanted]] = True
        return keep

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``): the cosine similarity matrix of all ``n`` hidden
        states present (special tokens included, as ``max_min_diverse`` computes it), ``3 n d + 2 n² d``; the
        greedy max-min sweeps are comparisons."""
        if site.keep == 0:
            return 0.0
        return site.cosine_matrix(site.tokens, site.hidden)
