"""ATP-LLaVA-style instance- and layer-adaptive visual-token pruning at ``llm.<k>`` sites, on the frozen MLLM.

At each site (default: two, spread over the LLM) a stage has

- a **token score head**: ``LayerNorm → Linear(d → w) → GELU → Linear(w → 1)`` on each live visual token
  (detached), and
- a **threshold head**: ``[mean of the sample's visual features ⊕ LayerNorm → Linear → GELU of the text mean
  ⊕ log(keep target)] → Linear(2w + 1 → w) → GELU → Linear(w → 1)``, one threshold per sample.

A visual token is kept where its score exceeds its sample's threshold, so each sample keeps its own count at
each site (``keeps_budget_count`` is False): inference ignores ``num_keep`` except through the keep target the
threshold head reads. **The budget is met on average, not per sample**: training adds the budget term (the
batch's mean kept fraction against the target, ``budget_weight``), so at inference the mean keep ratio over
samples approaches the budget while single samples keep more or fewer (``kept_counts`` holds the last call's
counts per site, for a bench to report their spread). Every sample with visual tokens keeps at least
``min_keep`` (the best-scored ones).

Training (``keep_policy`` in train mode): ``sigmoid((score − threshold) / tau)`` with a straight-through hard
decision (the same rule as inference), no noise.

ATP-LLaVA (Ye et al., CVPR 2025, arXiv 2412.00447) has no public code; what differs from its description is
listed in ``docs/methods.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from tokensift.scorers.base import MethodConfig, TokenMethod, check_scores
from tokensift.scorers.learned import (
    check_float,
    check_int,
    check_llm_sites,
    gather_tokens,
    masked_mean,
    pack_index,
    straight_through,
    unpack,
)
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class ATPConfig(MethodConfig):
    """``hidden_size``, ``width`` and ``sites`` are filled from the backbone by ``ATPMethod.for_backbone``."""

    hidden_size: int | None = field(default=None, metadata={"help": "The LLM's hidden size; filled from the backbone."})
    num_stages: int = field(
        default=2, metadata={"help": "Default sites: this many llm.<k> sites spread over the LLM's depth."}
    )
    width: int | None = field(
        default=None,
        metadata={"help": "Width of the score and threshold heads (default: hidden_size // 8, between 8 and 512)."},
    )
    tau: float = field(
        default=1.0, metadata={"help": "Temperature of the training surrogate sigmoid((score - threshold) / tau)."}
    )
    budget_weight: float = field(
        default=2.0,
        metadata={"help": "Weight of the budget term (mean kept fraction vs target)² (ATP-LLaVA's value not public)."},
    )
    min_keep: int = field(
        default=1, metadata={"help": "Visual tokens every sample that has some keeps at each site, at least."}
    )

    def __post_init__(self) -> None:
        check_int(self, "hidden_size", optional=True)
        check_int(self, "num_stages")
        check_int(self, "width", optional=True)
        check_float(self, "tau")
        check_float(self, "budget_weight", low_open=False)
        check_int(self, "min_keep", minimum=0)
        check_llm_sites(self)


def default_width(hidden_size: int) -> int:
    return min(512, max(8, hidden_size // 8))


class ATPStage(nn.Module):
    """One site: token scores ``[B, M]`` of packed visual tokens (centred per sample) and a threshold ``[B]`` per
    sample."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.token = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU())
        self.score = nn.Linear(width, 1)
        self.text = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU())
        self.threshold = nn.Sequential(nn.Linear(2 * width + 1, width), nn.GELU(), nn.Linear(width, 1))
        # the threshold starts near 0, so an untrained stage keeps the tokens its score head scores positive (about
        # half) rather than a random share; a small, not zero, weight keeps gradients reaching the text branch
        with torch.no_grad():
            self.threshold[-1].weight.mul_(0.01)
            self.threshold[-1].bias.zero_()

    def forward(self, visual: Tensor, weight: Tensor, text_mean: Tensor, keep_target: Tensor) -> tuple[Tensor, Tensor]:
        features = self.token(visual)
        # centred over the sample's live visual tokens: a shift of every score is the threshold's job, so the task
        # loss (every extra token helps) cannot grow all scores at once and leave the ranking untrained
        scores = self.score(features).squeeze(-1)
        scores = scores - masked_mean(scores, weight.to(scores.dtype))
        w = weight.to(features.dtype).unsqueeze(-1)
        pooled = (features * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-6)
        target = keep_target.clamp_min(1e-3).log().to(features.dtype).unsqueeze(-1)
        threshold = self.threshold(torch.cat([pooled, self.text(text_mean), target], dim=-1)).squeeze(-1)
        return scores, threshold


@register
class ATPMethod(TokenMethod):
    name = "atp"
    kind = "learned"
    config_class = ATPConfig
    site_kinds = ("llm",)
    num_default_sites = 2
    description = (
        "ATP-LLaVA-style adaptive pruning: per-layer token scores against a per-sample learned threshold, "
        "so each sample keeps its own count; the budget holds on average (learned)"
    )

    def __init__(self, config: ATPConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None or cfg.sites is None:
            raise ValueError(
                "ATPConfig needs hidden_size and sites: build it with ATPMethod.for_backbone(adapter), "
                "or load a trained one (ts.apply(model, 'path/to/artifact'))."
            )
        if cfg.width is None:
            cfg.width = default_width(cfg.hidden_size)
        self.stages = nn.ModuleList(ATPStage(cfg.hidden_size, cfg.width) for _ in cfg.sites)
        # the last call's per-sample visual tokens kept / offered at each site (detached, on the model's device)
        self.kept_counts: dict[str, Tensor] = {}
        self.visual_counts: dict[str, Tensor] = {}
        self.thresholds: dict[str, Tensor] = {}

    @classmethod
    def for_backbone(cls, adapter, config: ATPConfig | None = None) -> ATPMethod:
        config = replace(config) if config is not None else ATPConfig()  # the caller's config stays as given
        if config.hidden_size is None:
            config.hidden_size = adapter.hidden_size
        if config.width is None:
            config.width = default_width(config.hidden_size)
        if config.sites is None:
            config.sites = adapter.spread_llm_sites(config.num_stages)
        check_llm_sites(config, adapter.num_layers)
        return cls(config)

    @property
    def keeps_budget_count(self) -> bool:
        """Each sample keeps its own count (score > threshold): the trainer adds the budget term."""
        return False

    @property
    def kept_fractions(self) -> dict[str, Tensor]:
        """Per site, ``[B]`` float: the last call's kept visual tokens over those that reached the site."""
        counts = self.visual_counts
        return {site: kept.float() / counts[site].clamp(min=1).float() for site, kept in self.kept_counts.items()}

    def margins(self, state: TokenState) -> Tensor:
        """``[B, N]`` score − threshold of each live visual token (0 elsewhere); kept where positive."""
        require(state, "valid", self.name)
        text_mean = require(state, "text_mean", self.name)
        if state.keep_target is None:
            raise ValueError(f"{self.name} reads the site's keep target (state.keep_target); the handle sets it.")
        try:
            stage = self.stages[self.config.sites.index(state.site)]
        except ValueError:
            sites = self.config.sites
            raise ValueError(f"atp has stages at {sites}, not at {state.site}; run it at its own sites.") from None
        candidates = state.prunable
        index, valid = pack_index(candidates)
        dtype = stage.score.weight.dtype
        visual = gather_tokens(state.hidden.detach().to(dtype), index)
        weight = valid.to(dtype) if state.policy is None else state.policy.to(dtype).gather(1, index) * valid
        scores, threshold = stage(visual, weight, text_mean.detach().to(dtype), state.keep_target.to(visual.device))
        self.thresholds[state.site] = threshold.detach()
        return unpack(scores - threshold.unsqueeze(1), index, valid, state.hidden.shape[1])

    def score(self, state: TokenState) -> Tensor:
        return self.margins(state)

    def _hard(self, margins: Tensor, candidates: Tensor) -> Tensor:
        """Kept where the margin is positive, plus each sample's ``min_keep`` best candidates."""
        order = margins.detach().masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        return candidates & ((margins > 0) | (rank < self.config.min_keep))

    def _record(self, site: str, keep: Tensor, candidates: Tensor) -> None:
        self.kept_counts[site] = keep.sum(dim=1).detach()
        self.visual_counts[site] = candidates.sum(dim=1).detach()

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """Each sample's visual tokens whose score exceeds its threshold (at least ``min_keep``), and its protected
        ones. ``num_keep`` is not a count here: the budget reaches the method as the keep target it reads."""
        margins = self.margins(state).float()
        candidates = state.prunable
        check_scores(margins, candidates, self.name, state.site)
        keep = self._hard(margins, candidates)
        self._record(state.site, keep, candidates)
        return keep | (state.protected & state.alive)

    def keep_policy(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """Training: ``sigmoid(margin / tau)`` backward, the inference rule forward; text and specials 1."""
        if not self.training:
            return super().keep_policy(state, num_keep)
        margins = self.margins(state)
        candidates = state.prunable
        hard = self._hard(margins, candidates)
        self._record(state.site, hard, candidates)
        decision = straight_through(torch.sigmoid(margins / self.config.tau), hard) * candidates.to(margins.dtype)
        decision = torch.where(state.protected, torch.ones_like(decision), decision)
        return decision if state.policy is None else decision * state.policy

    def analytic_flops(self, site) -> float:
        """One sample at one site (a ``tokensift.flops.SiteShape``: ``v`` visual, ``t`` text tokens, width ``d``; head
        width ``w``): the token head ``3 v d + 2 v d w + 2 v w``, the pooled features ``v w``, the text mean ``t d``
        and its projection ``3 d + 2 d w``, the threshold head ``2 (2w + 1) w + 2 w``."""
        v, t, d, w = site.prunable, site.protected, site.hidden, self.config.width
        if v == 0:
            return 0.0
        tokens = site.normalize(v, d) + site.matmul(v, d, w) + site.matmul(v, w, 1) + v * w
        text = t * d + site.normalize(1, d) + site.matmul(1, d, w)
        threshold = site.matmul(1, 2 * w + 1, w) + site.matmul(1, w, 1)
        return float(tokens + text + threshold)
