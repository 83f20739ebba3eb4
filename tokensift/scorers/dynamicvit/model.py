"""DynamicViT's prediction module, one per stage, trained on a frozen backbone.

Per token: LayerNorm → Linear → GELU gives a feature whose first half is local and whose second half
is pooled over the live patch tokens (weighted by the current policy) as global context; local ⊕
global → MLP → keep logit. Training samples a hard keep decision with binary Gumbel noise and a
straight-through gradient, multiplied into the previous stage's decision (a dropped token stays
dropped). At inference the logits rank tokens and the budget picks the top ones.

``budget_conditioned``: the MLP also reads ``log(keep target)`` of the site, so one scorer trained
over a range of keep ratios knows which budget it is asked to meet (the budget loss is then
consistent across ratios instead of pulling towards their mean).

``train_by_removal``: training removes the dropped tokens, as inference does, instead of masking them
(``ScorerTrainer`` trains in gather mode, and the forward pass is the pruned inference's). How the loss reaches
the predictors (``removal_gradient``):

- ``kept_tokens`` (default): ``keep_policy``'s Gumbel top-k decides (``removal_policy``). The next block runs on
  every token with that straight-through policy in its attention (DynamicViT's policy attention: dropped tokens
  invisible to the others, with its gradient towards keeping them) and the handle removes the dropped tokens
  after it. The kept tokens' forward pass is the pruned inference's; every decision learns from that one block
  (mask mode: from every later block). Carrying the survivors' policy (1 forward) into the later blocks as well
  changed nothing on the demo and costs the fast attention kernel there; carrying it *instead of* the next block
  trained a ranking worse than random: the derivative at ``p = 1`` says whether *more* of a kept token helps,
  not whether keeping it does.
- ``next_block_bias`` (STTS): ``reduce`` returns the Gumbel top-k keep plus a key bias ``log s`` for the next
  block, ``s`` the sigmoid of the centred logits min-max rescaled per image to ``[e^-2, 1]`` (never blocking); the
  handle removes the dropped tokens after that block. On the frozen demo ViT this one-block signal trained a
  ranking worse than random (``docs/methods.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from tokensift.scorers.base import KeepDecision, MethodConfig, TokenMethod, check_scores, top_k_mask
from tokensift.scorers.learned import logistic_noise, masked_mean
from tokensift.scorers.registry import register
from tokensift.state import SampleCounter, TokenState, with_sample_index


@dataclass
class DynamicViTConfig(MethodConfig):
    """``hidden_size`` and ``sites`` are filled from the backbone when left unset."""

    hidden_size: int | None = None
    num_stages: int = 3
    hidden_ratio: float = 0.5  # predictor width relative to the backbone's hidden size
    budget_conditioned: bool = True
    gumbel_tau: float = 1.0
    # "topk": keep exactly the budget's count of the Gumbel-perturbed logits (Gumbel top-k), so training
    # keeps what inference keeps; "threshold": DynamicViT's per-token binary Gumbel decision (variable count)
    selection: str = "topk"
    train_by_removal: bool = field(
        default=False,
        metadata={
            "help": "Train by removing tokens (gather mode) instead of masking them: the Gumbel top-k keep plus a "
            "log-score key bias at the next block (STTS), dropped tokens removed after it. Needs selection: topk."
        },
    )

    removal_gradient: str = field(
        default="kept_tokens",
        metadata={
            "help": "How train_by_removal's loss reaches the predictors: 'kept_tokens' (the Gumbel top-k policy in "
            "the next block's policy attention, the dropped tokens removed after it) or "
            "'next_block_bias' (STTS: log of the score rescaled per image to [e^-2, 1] at the next block; on the "
            "frozen demo ViT it trained a ranking worse than random)."
        },
    )

    def __post_init__(self) -> None:
        if self.removal_gradient not in ("kept_tokens", "next_block_bias"):
            raise ValueError(
                "DynamicViTConfig.removal_gradient must be 'kept_tokens' or 'next_block_bias', got "
                f"{self.removal_gradient!r}."
            )
        if self.selection not in ("topk", "threshold"):
            raise ValueError(f"selection must be 'topk' or 'threshold', got {self.selection!r}")
        if not isinstance(self.train_by_removal, bool):
            raise ValueError(f"DynamicViTConfig.train_by_removal must be true or false, got {self.train_by_removal!r}.")
        if self.train_by_removal and self.selection != "topk":
            raise ValueError(
                "DynamicViTConfig.train_by_removal removes tokens, so every image of a batch keeps the budget's count: "
                f"it needs selection: topk, got selection: {self.selection!r}."
            )


class _Predictor(nn.Module):
    def __init__(self, dim: int, width: int, conditioned: bool):
        super().__init__()
        self.conditioned = conditioned
        self.in_proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU())
        extra = 1 if conditioned else 0
        self.head = nn.Sequential(
            nn.Linear(width + extra, width // 2),
            nn.GELU(),
            nn.Linear(width // 2, width // 4),
            nn.GELU(),
            nn.Linear(width // 4, 1),
        )

    def forward(self, hidden: Tensor, pool_weight: Tensor, keep_target: Tensor | None) -> Tensor:
        feat = self.in_proj(hidden)
        local, glob = feat.chunk(2, dim=-1)
        w = pool_weight.to(feat.dtype).unsqueeze(-1)
        glob = (glob * w).sum(dim=1, keepdim=True) / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        parts = [local, glob.expand_as(local)]
        if self.conditioned:
            target = keep_target.clamp_min(1e-3).log().to(feat.dtype)
            parts.append(target.view(-1, 1, 1).expand(-1, feat.shape[1], 1))
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1)


@register
class DynamicViTMethod(TokenMethod):
    name = "dynamicvit"
    kind = "learned"
    config_class = DynamicViTConfig
    num_default_sites = 3
    description = "DynamicViT prediction modules: local ⊕ global features → MLP → keep logit (learned)"

    def __init__(self, config: DynamicViTConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None or cfg.sites is None:
            raise ValueError(
                "DynamicViTConfig needs hidden_size and sites; build it with DynamicViTMethod.for_backbone()."
            )
        width = max(8, int(cfg.hidden_size * cfg.hidden_ratio) // 4 * 4)
        self.predictors = nn.ModuleList(_Predictor(cfg.hidden_size, width, cfg.budget_conditioned) for _ in cfg.sites)
        self._samples = SampleCounter()  # Gumbel noise for states without a sample index: rows in arrival order

    @classmethod
    def for_backbone(cls, adapter, config: DynamicViTConfig | None = None) -> DynamicViTMethod:
        config = replace(config) if config is not None else DynamicViTConfig()  # the caller's config stays as given
        if config.hidden_size is None:
            config.hidden_size = adapter.hidden_size
        if config.sites is None:
            config.sites = adapter.spread_sites(config.num_stages)
        return cls(config)

    @property
    def keeps_budget_count(self) -> bool:
        """``topk`` keeps exactly the budget's count in training too; ``threshold`` keeps a variable count."""
        return self.config.selection == "topk"

    @property
    def trains_by_removal(self) -> bool:
        """Training runs in gather mode: ``reduce`` in train mode returns the keep plus a next-block key bias."""
        return self.config.train_by_removal

    @property
    def removal_policy(self) -> bool:
        """Gather-mode training keeps this method's ``keep_policy`` on the survivors (``PruningHandle``)."""
        return self.config.train_by_removal and self.config.removal_gradient == "kept_tokens"

    def reduce(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        """Inference: the top-k of the logits. Training by removal with ``next_block_bias``: the Gumbel top-k plus
        STTS's rescaled log-score key bias for the next block."""
        if not (self.training and self.config.train_by_removal):
            return super().reduce(state, num_keep)
        logits = self.score(state).float()
        check_scores(logits, state.prunable, self.name, state.site)
        logits = logits - masked_mean(logits, state.prunable)
        u = with_sample_index(state, self._samples).uniform(0, stream="dynamicvit.gumbel")
        perturbed = logits.detach() + logistic_noise(u)  # the Gumbel top-k of keep_policy's topk selection
        keep = top_k_mask(perturbed, state, num_keep)
        return KeepDecision(keep, key_bias=removal_key_bias(logits, state.prunable))

    def score(self, state: TokenState) -> Tensor:
        stage = self.config.sites.index(state.site)
        pool_weight = state.prunable.float() if state.policy is None else state.policy * (~state.protected)
        return self.predictors[stage](state.hidden, pool_weight, state.keep_target)

    def keep_policy(self, state: TokenState, num_keep: Tensor) -> Tensor:
        if not self.training:
            return super().keep_policy(state, num_keep)
        logits = self.score(state)
        if self.config.selection == "topk":
            logits = logits - masked_mean(logits, state.prunable)
        # per sample, a function of (sample index, draw = the trainer's (seed, step), site, token): the same
        # however a batch is split over ranks, so 1 process and N processes train alike
        u = with_sample_index(state, self._samples).uniform(0, stream="dynamicvit.gumbel")
        noise = logistic_noise(u)  # binary Gumbel-softmax
        perturbed = logits + noise.to(logits.dtype)
        # topk: kept by rank, exactly num_keep per sample even when perturbed logits tie at the threshold (removal
        # training compacts by this decision and needs equal counts); threshold: by sign
        ranked_keep = top_k_mask(perturbed.detach(), state, num_keep) if self.config.selection == "topk" else None
        if self.config.selection == "topk":
            candidates = perturbed.masked_fill(~state.prunable, float("-inf"))
            ranked = candidates.sort(dim=1, descending=True).values
            # per sample, threshold halfway between its last kept and its first dropped perturbed logit (keeping
            # all: 1 below the last); index k - 1 wraps as Python's would for k = 0
            width = ranked.shape[1]
            k = num_keep.to(ranked.device).long().view(-1, 1).expand(ranked.shape[0], 1)
            last = ranked.gather(1, (k - 1) % width).squeeze(1)
            low = ranked.gather(1, k.clamp(max=width - 1)).squeeze(1).clamp_min(last - 1.0)
            threshold = torch.where(k.squeeze(1) < width, (last + low) / 2, ranked[:, -1] - 1.0)
            perturbed = perturbed - threshold.detach().unsqueeze(1)
        soft = torch.sigmoid(perturbed / self.config.gumbel_tau)
        hard = (soft > 0.5 if ranked_keep is None else ranked_keep).to(soft.dtype)
        decision = hard - soft.detach() + soft  # straight-through
        previous = torch.ones_like(decision) if state.policy is None else state.policy
        decision = torch.where(state.protected, torch.ones_like(decision), decision)
        return decision * previous


REMOVAL_BIAS_FLOOR = -2.0  # STTS's rescale_bias_min = e^-2: the weakest patch keeps e^-2 of its attention weight


def removal_key_bias(logits: Tensor, candidates: Tensor) -> Tensor:
    """``[B, N]`` key bias ``log s`` with ``s = sigmoid(logits)`` min-max rescaled per row over ``candidates`` to
    ``[e^-2, 1]`` (STTS's ``rescale_bias_min``); 0 elsewhere (protected tokens). A row whose candidates all score the
    same gets 0 for all of them."""
    scores = torch.sigmoid(logits.float())
    low = scores.masked_fill(~candidates, float("inf")).amin(1, keepdim=True)
    high = scores.masked_fill(~candidates, float("-inf")).amax(1, keepdim=True)
    span = (high - low).clamp_min(1e-12)
    floor = math.exp(REMOVAL_BIAS_FLOOR)
    rescaled = floor + (1.0 - floor) * (scores - low) / span
    rescaled = torch.where(high > low, rescaled, torch.ones_like(rescaled))
    return torch.where(candidates, rescaled.clamp(floor, 1.0).log(), torch.zeros_like(rescaled))

