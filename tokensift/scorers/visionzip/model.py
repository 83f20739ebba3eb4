"""VisionZip: keep the dominant visual tokens by vision-tower attention, merge the rest into a few contextual ones.

Dominant tokens are those the vision tower's [CLS] attends to most at the layer whose output becomes the
features (SigLIP / Qwen2-VL, without [CLS]: the attention each token receives), summed over heads. Of the
rest, evenly spaced tokens become contextual anchors; every other remaining token joins the anchor whose
tower key is most similar (cosine) and the anchor's features become the mean of its group. The split of
the budget follows VisionZip's 54 dominant + 10 contextual of 64.

Runs at ``pre_llm`` on the projected features, so the merge averages what the LLM reads (VisionZip
merges before the projector; with a non-linear projector the two differ slightly). We average the whole
group, anchor included; VisionZip adds the anchor to the mean of the others, which doubles its scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import KeepDecision, MethodConfig, TokenMethod
from tokensift.scorers.multimodal import cosine_similarity_matrix, require
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class VisionZipConfig(MethodConfig):
    """``contextual_fraction``: share of the kept visual tokens that are merged contextual tokens."""

    contextual_fraction: float = 10 / 64

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.contextual_fraction) < 1.0:
            raise ValueError(f"contextual_fraction must be in [0, 1), got {self.contextual_fraction!r}.")


@register
class VisionZipMethod(TokenMethod):
    name = "visionzip"
    config_class = VisionZipConfig
    needs_tower_attention = True
    site_kinds = ("pre_llm",)
    description = "dominant tokens by vision-tower attention + contextual merge of the rest (VisionZip)"

    def reduce(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        importance = require(state, "tower_attention", self.name)
        tower_keys = require(state, "tower_keys", self.name)
        keep = state.protected & state.alive
        hidden = state.hidden.clone()
        for b in range(hidden.shape[0]):
            candidates = state.prunable[b].nonzero().squeeze(1)
            budget = min(int(num_keep[b]), candidates.numel())
            if budget == 0:
                continue
            contextual = min(round(budget * self.config.contextual_fraction), budget - 1)
            order = importance[b, candidates].float().argsort(descending=True, stable=True)
            dominant = candidates[order[: budget - contextual]]
            keep[b, dominant] = True
            rest = candidates[order[budget - contextual :]].sort().values  # in sequence order, as VisionZip
            if contextual == 0 or rest.numel() == 0:
                continue
            step = max(1, rest.numel() // contextual)
            anchor_slots = torch.arange(0, rest.numel(), step, device=rest.device)[:contextual]
            anchors = rest[anchor_slots]
            similarity = cosine_similarity_matrix(tower_keys[b, rest])[:, anchor_slots]  # [rest, anchors]
            group = similarity.argmax(dim=1)
            group[anchor_slots] = torch.arange(anchors.numel(), device=rest.device)  # an anchor joins its own group
            sums = torch.zeros(anchors.numel(), hidden.shape[-1], device=hidden.device, dtype=torch.float32)
            sums.index_add_(0, group, state.hidden[b, rest].float())
            sizes = torch.bincount(group, minlength=anchors.numel()).clamp(min=1).unsqueeze(1)
            hidden[b, anchors] = (sums / sizes).to(hidden.dtype)
            keep[b, anchors] = True
        return KeepDecision(keep, hidden)

    def analytic_flops(self, site) -> float:
        """FLOPs at a ``pre_llm`` site (a ``tokensift.flops.SiteShape``) beyond the tower's captured map (charged
        by the bench for ``needs_tower_attention``): with ``c`` contextual tokens and ``r`` tokens left after the
        dominant ones, the cosine similarity of the ``r`` tower keys (width ``h_t``; all pairs, of which the anchors'
        columns are read) ``3 r h_t + 2 r² h_t``, then each group's sum ``r d`` and mean ``min(c, r) d``."""
        budget = min(site.keep, site.prunable)
        if budget == 0:
            return 0.0
        contextual = min(round(budget * self.config.contextual_fraction), budget - 1)
        rest = site.prunable - (budget - contextual)
        if contextual == 0 or rest == 0:
            return 0.0
        return site.cosine_matrix(rest, site.tower_head_dim) + (rest + min(contextual, rest)) * site.hidden
