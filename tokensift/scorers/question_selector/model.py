"""A question-aware visual-token selector before the LLM (``pre_llm``), trained on the frozen MLLM's answer loss.

Each sample's projected visual tokens and its text tokens (the question and the prompt around it: every text /
special token of the sample in the LLM's input embeddings, padding excluded) are read from the same
``state.hidden``, detached. Both go through ``LayerNorm → Linear`` to a small width ``w``; each visual token
attends (one head, masked to its own sample's text tokens) to the text; then

    local ⊕ attended question ⊕ mean of the sample's visual features ⊕ log(keep target) → MLP → keep logit.

Inference keeps the top ``num_keep[b]`` visual tokens of sample ``b`` by logit (``TokenMethod.select``).
Training (``relaxation: soft``, the default) keeps them in sum: ``sigmoid((logit − θ_b)/τ)`` with ``θ_b`` set so the
row sums to ``num_keep[b]`` and its implicit gradient (``tokensift.scorers.learned.soft_top_k``); ``gumbel`` keeps
exactly that count with a straight-through Gumbel top-k (noise ``state.uniform(0, "question_selector.gumbel")``),
which on digit VQA trained the ranking below random.

Cost: ``analytic_flops``; on the tiny demo models it is below 2 % of the LLM's prefill (a test pins it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.learned import (
    check_choice,
    check_float,
    check_int,
    gather_tokens,
    pack_index,
    soft_top_k,
    straight_through_top_k,
    unpack,
)
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import SampleCounter, TokenState, with_sample_index

TEXT = 0
GUMBEL_STREAM = "question_selector.gumbel"


@dataclass
class QuestionSelectorConfig(MethodConfig):
    """``hidden_size`` and ``width`` are filled from the backbone by ``QuestionSelectorMethod.for_backbone``."""

    hidden_size: int | None = field(
        default=None, metadata={"help": "The LLM's hidden size (its input embeddings); filled from the backbone."}
    )
    width: int | None = field(
        default=None,
        metadata={
            "help": "Width of the selector's visual and text features (default: hidden_size // 8, between 8 and 512)."
        },
    )
    relaxation: str = field(
        default="soft",
        metadata={
            "help": "Training decision: 'soft' (sigmoid around the threshold that keeps the budget's count in sum, "
            "with its implicit gradient: learns) or 'gumbel' (straight-through Gumbel top-k, hard like inference)."
        },
    )
    tau_start: float = field(
        default=1.0, metadata={"help": "Temperature of the training decision's sigmoid at the start of training."}
    )
    tau_end: float = field(
        default=0.05,
        metadata={
            "help": "Temperature at the end (geometric schedule through set_progress): a soft decision hardens "
            "towards the hard top-k inference keeps; on digit VQA annealing 1 → 0.05 gained 4 points over a fixed 0.5."
        },
    )

    def __post_init__(self) -> None:
        check_int(self, "hidden_size", optional=True)
        check_int(self, "width", optional=True)
        check_float(self, "tau_start")
        check_float(self, "tau_end")
        check_choice(self, "relaxation", ("soft", "gumbel"))
        if self.sites is not None and list(self.sites) != ["pre_llm"]:
            raise ValueError(
                f"QuestionSelectorConfig.sites must be ['pre_llm'] (or null), got {self.sites!r}: the selector reads "
                "the LLM's input embeddings."
            )


def default_width(hidden_size: int) -> int:
    return min(512, max(8, hidden_size // 8))


class QuestionScorer(nn.Module):
    """Keep logits of a sample's visual tokens given its text tokens (all packed ``[B, M, D]``, with masks)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.width = width
        self.visual_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.text_in = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width))
        self.query = nn.Linear(width, width)
        self.key_value = nn.Linear(width, 2 * width)
        self.head = nn.Sequential(nn.Linear(3 * width + 1, width), nn.GELU(), nn.Linear(width, 1))

    def forward(
        self, visual: Tensor, visual_valid: Tensor, text: Tensor, text_valid: Tensor, keep_target: Tensor
    ) -> Tensor:
        local = self.visual_in(visual)  # [B, V, w]
        keys, values = self.key_value(self.text_in(text)).chunk(2, dim=-1)  # [B, T, w] each
        logits = self.query(local) @ keys.transpose(1, 2) / math.sqrt(self.width)  # [B, V, T]
        logits = logits.masked_fill(~text_valid.unsqueeze(1), torch.finfo(logits.dtype).min)
        weights = logits.softmax(dim=-1) * text_valid.any(dim=1).to(logits.dtype).view(-1, 1, 1)  # no text: 0
        attended = weights @ values
        pool = visual_valid.to(local.dtype).unsqueeze(-1)
        pooled = (local * pool).sum(dim=1, keepdim=True) / pool.sum(dim=1, keepdim=True).clamp_min(1.0)
        target = keep_target.clamp_min(1e-3).log().to(local.dtype).view(-1, 1, 1).expand(-1, local.shape[1], 1)
        features = torch.cat([local, attended, pooled.expand_as(local), target], dim=-1)
        return self.head(features).squeeze(-1)


@register
class QuestionSelectorMethod(TokenMethod):
    name = "question_selector"
    kind = "learned"
    config_class = QuestionSelectorConfig
    site_kinds = ("pre_llm",)
    description = (
        "question-aware selector before the LLM: visual tokens cross-attend to the question, MLP → keep logit (learned)"
    )

    def __init__(self, config: QuestionSelectorConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None:
            raise ValueError(
                "QuestionSelectorConfig needs hidden_size: build it with QuestionSelectorMethod.for_backbone(adapter), "
                "or load a trained one (ts.apply(model, 'path/to/artifact'))."
            )
        if cfg.sites is None:
            cfg.sites = ["pre_llm"]
        if cfg.width is None:
            cfg.width = default_width(cfg.hidden_size)
        self.scorer = QuestionScorer(cfg.hidden_size, cfg.width)
        self.tau = cfg.tau_start
        self._samples = SampleCounter()  # Gumbel noise for states without a sample index: rows in arrival order

    @classmethod
    def for_backbone(cls, adapter, config: QuestionSelectorConfig | None = None) -> QuestionSelectorMethod:
        config = replace(config) if config is not None else QuestionSelectorConfig()  # the caller keeps its config
        if config.hidden_size is None:
            config.hidden_size = adapter.hidden_size
        if config.width is None:
            config.width = default_width(config.hidden_size)
        if config.sites is None:
            config.sites = ["pre_llm"]
        return cls(config)

    def score(self, state: TokenState) -> Tensor:
        """``[B, N]`` keep logits of the live visual tokens (0 at every other slot)."""
        valid = require(state, "valid", self.name)
        kind = require(state, "kind", self.name)
        candidates = state.prunable
        text = valid & ~candidates & (kind == TEXT)
        dtype = self.scorer.head[0].weight.dtype
        hidden = state.hidden.detach().to(dtype)
        visual_index, visual_valid = pack_index(candidates)
        text_index, text_valid = pack_index(text)
        if state.keep_target is None:
            raise ValueError(f"{self.name} reads the site's keep target (state.keep_target); the handle sets it.")
        packed = self.scorer(
            gather_tokens(hidden, visual_index),
            visual_valid,
            gather_tokens(hidden, text_index),
            text_valid,
            state.keep_target.to(hidden.device),
        )
        return unpack(packed, visual_index, visual_valid, state.hidden.shape[1])

    def set_progress(self, fraction: float) -> None:
        """Anneal the training decision's temperature: ``tau_start · (tau_end / tau_start) ** fraction``."""
        cfg = self.config
        self.tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** min(1.0, max(0.0, float(fraction)))

    def keep_policy(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """Mask mode: exactly ``num_keep[b]`` visual tokens (Gumbel top-k in training), text and specials 1."""
        if not self.training:
            return super().keep_policy(state, num_keep)
        logits = self.score(state)
        if self.config.relaxation == "soft":
            decision = soft_top_k(logits, state.prunable, num_keep, self.tau)
        else:
            uniform = with_sample_index(state, self._samples).uniform(0, stream=GUMBEL_STREAM)
            decision = straight_through_top_k(logits, state.prunable, num_keep, uniform, self.tau)
        decision = torch.where(state.protected, torch.ones_like(decision), decision)
        return decision if state.policy is None else decision * state.policy

    def analytic_flops(self, site) -> float:
        """One sample at ``pre_llm`` (a ``tokensift.flops.SiteShape``: ``v`` visual, ``t = n − v`` text tokens, width
        ``d``; selector width ``w``): layer norms ``3 (v + t) d``; the input linears ``2 (v + t) d w``; query ``2 v w²``
        and keys / values ``4 t w²``; scores and weighted sum ``4 v t w`` plus the softmax ``6 v t``; the visual mean
        ``v w``; the head ``2 v ((3w + 1) w + w)``."""
        v, t, d, w = site.prunable, site.protected, site.hidden, self.config.width
        if v == 0:
            return 0.0
        norms = site.normalize(v + t, d)
        inputs = site.matmul(v + t, d, w)
        projections = site.matmul(v, w, w) + site.matmul(t, w, 2 * w)
        attention = site.matmul(v, w, t) + site.matmul(v, t, w) + 6.0 * v * t
        head = site.matmul(v, 3 * w + 1, w) + site.matmul(v, w, 1)
        return float(norms + inputs + projections + attention + v * w + head)
