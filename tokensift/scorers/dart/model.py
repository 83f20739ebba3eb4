"""DART: keep pivot tokens and the visual tokens least similar to them (duplication matters more).

At layer K (K=2 in the paper) a few pivots are picked by the L1 norm of their keys at layer K-1: visual
pivots (kept) and text pivots among the tokens after the image. Each pivot then claims, among the visual
tokens not yet kept, an equal share of the budget: those with the lowest cosine similarity to it in
``norm(hidden states entering layer K)``, the LM's final RMSNorm applied to layer K-1's output as DART's
LLaVA and Qwen2-VL code does (``last_layer_state = self.norm(layer_outputs[0])``; the norm's per-channel
weight changes which tokens are least similar). Pivots claim in ascending sequence order (DART iterates a
Python ``set`` of their indices, which is ascending while the indices are below the set's table size, and
hash order beyond). No attention map is needed, so every layer keeps its kernel (SDPA, flash); the keys
come from a hook on layer K-1's key projection, rotated by the handle with that layer's RoPE as DART's
forked attention returns them (RoPE keeps their L2 norm but not their L1 norm; DART's keys are also
repeated per query head under grouped-query attention, which scales every token's L1 norm alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class DARTConfig(MethodConfig):
    """``layer``: K (default site ``llm.<layer>``); ``image_pivots`` / ``text_pivots``: pivots of each kind."""

    layer: int = 2
    image_pivots: int = 4
    text_pivots: int = 4

    def __post_init__(self) -> None:
        for name in ("image_pivots", "text_pivots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
        if self.image_pivots + self.text_pivots == 0:
            raise ValueError("DART needs at least one pivot: set image_pivots or text_pivots above 0.")


@register
class DARTMethod(TokenMethod):
    name = "dart"
    config_class = DARTConfig
    needs_keys = True
    needs_final_norm = True
    site_kinds = ("llm",)
    description = "keep pivot tokens (key norm) and the visual tokens least similar to them (DART)"

    def default_mllm_sites(self, adapter) -> list[str]:
        return [f"llm.{self.config.layer}"]

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        key_norm = require(state, "keys", self.name).abs().sum(dim=-1)  # [B, N], L1 as in DART
        normed = require(state, "normed_hidden", self.name)
        keep = state.protected & state.alive
        text = state.protected & state.alive
        positions = torch.arange(keep.shape[1], device=keep.device)
        for b in range(keep.shape[0]):
            visual = state.prunable[b].nonzero().squeeze(1)
            budget = min(int(num_keep[b]), visual.numel())
            if budget == 0:
                continue
            image_pivots = visual[key_norm[b, visual].argsort(descending=True)[: min(self.config.image_pivots, budget)]]
            after_image = text[b] & (positions > visual.max())  # the question, after the image as in DART
            queries = (after_image if bool(after_image.any()) else text[b]).nonzero().squeeze(1)
            text_pivots = queries[key_norm[b, queries].argsort(descending=True)[: self.config.text_pivots]]
            chosen = torch.zeros_like(keep[b])
            chosen[image_pivots] = True
            pivots = torch.cat([image_pivots, text_pivots]).sort().values
            remaining = budget - image_pivots.numel()
            share = math.ceil(remaining / max(1, pivots.numel()))
            features = normed[b].float()
            features = features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            for pivot in pivots.tolist():
                if remaining <= 0:
                    break
                free = visual[~chosen[visual]]
                similarity = features[free] @ features[pivot]
                take = free[similarity.argsort()[: min(share, remaining, free.numel())]]  # least similar first
                chosen[take] = True
                remaining -= take.numel()
            keep[b] |= chosen
        return keep

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``; the keys come from layer K-1's ``k_proj``, which
        the model computes anyway, and the LM's final norm is charged by the bench for ``needs_final_norm``): the
        keys' L1 norms ``2 n w_kv``; when the sample keeps a visual token, its ``n`` normed states normalised
        ``3 n d`` and each pivot's cosine similarity to the visual tokens not yet kept ``2 · free · d``, pivots
        taken in turn as :meth:`select` does (text pivots: at most the text tokens present)."""
        n, v, d = site.tokens, site.prunable, site.hidden
        total = 2.0 * n * site.kv_width
        budget = min(site.keep, v)
        if budget == 0:
            return total
        image_pivots = min(self.config.image_pivots, budget)
        pivots = image_pivots + min(self.config.text_pivots, site.protected)
        total += site.normalize(n, d)
        remaining, chosen = budget - image_pivots, image_pivots
        share = math.ceil(remaining / max(1, pivots))
        for _ in range(pivots):
            if remaining <= 0:
                break
            free = v - chosen
            total += site.matmul(free, d, 1)
            take = min(share, remaining, free)
            chosen, remaining = chosen + take, remaining - take
        return total
