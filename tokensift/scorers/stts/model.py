"""STTS: Molmo2's learned spatio-temporal token scorer inside the vision tower (``vit.<i>``), trained by removal.

At its one site (default ``vit.3``, the reference's ``prune_at``) the method gets one token per group of patches the
tower hands on as one LLM token (Molmo2: a pooling window; Qwen2-VL: an m×m merge group), one row per image or
video, with each group's patches (``state.group_patches``) and its (t, h, w). Per group:

- **pooling**: multi-head attention whose query is the mean of the group's patches and whose keys / values are the
  patches (the reference's ``ViTMultiHeadDotProductAttention`` pooler);
- **temporal context**: the pooled feature of the same (h, w) group in the previous frame of the same video, zeros
  in its first frame, concatenated before the current one;
- **score**: ``Linear(2D → m) → SiLU → Linear(m → m) → SiLU → Linear(m → 1) → sigmoid`` (``ScorerMLP``: truncated
  normal weights ``std = √(1 / fan_in)`` within ±2, zero biases).

**Keep rule** (the reference's ``prune_with_scorer``): a video keeps its first frame whole and, of its later frames,
the ``num_keep − first frame`` groups of highest score (the budget's count per video; the reference's
``81 · topk · frames`` pruned is this rule at ``keep_ratio = 1 − topk``); images (one frame) keep every group.

**Attention bias, removal one block later**: the scores, min-max rescaled per frame to ``[e^-2, 1]`` with the first
frame (and every image) at 1, become ``key_bias = log(score)``; the driver adds it to every key of the next block and
removes the dropped groups only after that block (``KeepDecision.key_bias``). That bias is the only path from the
answer loss to the scorer, the selection itself being a hard top-k, so training runs the inference path (gather mode,
``trains_by_removal``), which is also what makes training faster.

**Auxiliary temporal loss** (training): ``aux_weight · MSE(score, 1 − cos)`` over the groups of later video frames,
``cos`` the cosine between the same group's concatenated patches in this frame and in the previous one, at the site;
``auxiliary_losses()`` hands the trainer the mean over the last forward's tower calls.

What differs from the reference (allenai/molmo2 ``olmo/nn/temporal_image_vit.py``) is listed in ``docs/methods.md``.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensift.backbones.mllm import VIDEO
from tokensift.scorers.base import KeepDecision, MethodConfig, TokenMethod, check_scores
from tokensift.scorers.learned import check_choice, check_float, check_int
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import TokenState

RESCALE_SCOPES = ("frame", "row")


@dataclass
class STTSConfig(MethodConfig):
    """``hidden_size``, ``num_heads``, ``head_dim`` and ``mlp_dim`` are filled from the vision tower by
    ``STTSMethod.for_backbone``; ``sites`` is one ``vit.<i>`` site (default ``vit.3``)."""

    hidden_size: int | None = field(
        default=None, metadata={"help": "Width of the vision tower's hidden states; filled from the backbone."}
    )
    num_heads: int | None = field(
        default=None, metadata={"help": "Heads of the pooling attention (the tower's heads); filled from the backbone."}
    )
    head_dim: int | None = field(
        default=None,
        metadata={"help": "Width of each pooling head (the tower's head width); filled from the backbone."},
    )
    mlp_dim: int | None = field(
        default=None,
        metadata={"help": "Width of the scorer MLP's hidden layers (the tower's MLP width); filled from the backbone."},
    )
    rescale_min: float = field(
        default=math.exp(-2),
        metadata={"help": "Lowest rescaled score: the bias log(score) reaches log(rescale_min) (reference: e^-2)."},
    )
    rescale_scope: str = field(
        default="frame",
        metadata={
            "help": "Where the min-max rescale takes min and max: 'frame' (per frame, as the paper describes) or "
            "'row' (per row of groups within a frame, what the reference code computes)."
        },
    )
    aux_weight: float = field(
        default=0.5,
        metadata={"help": "Weight of the auxiliary temporal loss MSE(score, 1 - cos) (reference: 0.5); 0: none."},
    )
    initializer_range: float = field(
        default=0.02, metadata={"help": "Std of the pooling attention's normal initial weights (reference: 0.02)."}
    )
    patches_per_group: int = field(
        default=9,
        metadata={
            "help": "Patches per group, for analytic FLOPs before any call (Molmo2 video: 3x3 = 9; for_backbone sets "
            "Qwen2-VL's m*m); calls record what they saw."
        },
    )

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_heads", "head_dim", "mlp_dim"):
            check_int(self, name, optional=True)
        check_int(self, "patches_per_group")
        check_float(self, "rescale_min", high=1.0)
        if self.rescale_min >= 1.0:
            raise ValueError(f"STTSConfig.rescale_min must be below 1 (reference: e^-2), got {self.rescale_min!r}.")
        check_choice(self, "rescale_scope", RESCALE_SCOPES)
        check_float(self, "aux_weight", low_open=False)
        check_float(self, "initializer_range")
        check_vit_site(self)


def check_vit_site(config: STTSConfig, last_site: int | None = None) -> None:
    """``config.sites``: ``None`` or one ``vit.<i>`` site (STTS scores once), ``i <= last_site`` when known."""
    sites = config.sites
    if sites is None:
        return
    one = isinstance(sites, (list, tuple)) and len(sites) == 1 and isinstance(sites[0], str)
    index = sites[0][4:] if one and sites[0].startswith("vit.") else ""
    if not index.isdigit():
        raise ValueError(
            f"STTSConfig.sites must be one vit.<i> site (STTS scores once, e.g. ['vit.3']) or null, got {sites!r}."
        )
    if last_site is not None and int(index) > last_site:
        raise ValueError(
            f"STTSConfig.sites {list(sites)}: this tower's vit.<i> sites end at vit.{last_site} (the bias acts in the "
            f"next block, before the block whose output becomes the features); pass sites=['vit.<i>'] with i <= "
            f"{last_site}."
        )


class GroupPooler(nn.Module):
    """Multi-head attention pooling of each group's patches, the query the group's mean (the reference's
    ``ViTMultiHeadDotProductAttention(query, patches)``)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wq = nn.Linear(dim, heads * head_dim)
        self.wk = nn.Linear(dim, heads * head_dim)
        self.wv = nn.Linear(dim, heads * head_dim)
        self.wo = nn.Linear(heads * head_dim, dim)

    def reset_parameters(self, std: float) -> None:
        for linear in (self.wq, self.wk, self.wv, self.wo):
            nn.init.normal_(linear.weight, std=std)
            nn.init.zeros_(linear.bias)

    def forward(self, patches: Tensor, valid: Tensor) -> Tensor:
        """``patches [G, P, D]`` (zero at padded slots), ``valid [G, P]`` → ``[G, D]``."""
        groups, slots, _ = patches.shape
        query = patches.mean(dim=1, keepdim=True)  # over every slot, padded zeros included, as the reference
        q = self.wq(query).view(groups, 1, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(patches).view(groups, slots, self.heads, self.head_dim).transpose(1, 2)
        v = self.wv(patches).view(groups, slots, self.heads, self.head_dim).transpose(1, 2)
        compute = torch.promote_types(q.dtype, torch.float32)  # at least float32, as the reference's attention
        logits = (q.to(compute) / math.sqrt(self.head_dim)) @ k.to(compute).transpose(-1, -2)  # [G, H, 1, P]
        logits = logits.masked_fill(~valid.view(groups, 1, 1, slots), torch.finfo(logits.dtype).min)
        weights = logits.softmax(dim=-1).to(v.dtype)
        pooled = (weights @ v).transpose(1, 2).reshape(groups, self.heads * self.head_dim)
        return self.wo(pooled)


class ScorerMLP(nn.Module):
    """``Linear → SiLU → Linear → SiLU → Linear → 1`` (the reference's ``ScorerMLP``)."""

    def __init__(self, input_dim: int, mlp_dim: int):
        super().__init__()
        self.w1 = nn.Linear(input_dim, mlp_dim)
        self.w2 = nn.Linear(mlp_dim, mlp_dim)
        self.w3 = nn.Linear(mlp_dim, 1)
        self.act = nn.SiLU()

    def reset_parameters(self) -> None:
        for linear in (self.w1, self.w2, self.w3):
            nn.init.trunc_normal_(linear.weight, std=math.sqrt(1 / linear.in_features), a=-2.0, b=2.0)
            nn.init.zeros_(linear.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.w3(self.act(self.w2(self.act(self.w1(features))))).squeeze(-1)


class TemporalTokenScorer(nn.Module):
    """Sigmoid keep scores of groups from their patches and the previous frame's pooled feature."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_dim: int, initializer_range: float):
        super().__init__()
        self.pooler = GroupPooler(dim, heads, head_dim)
        self.mlp = ScorerMLP(2 * dim, mlp_dim)
        self.pooler.reset_parameters(initializer_range)
        self.mlp.reset_parameters()

    def forward(self, patches: Tensor, patch_valid: Tensor, previous: Tensor) -> Tensor:
        """``patches [B, N, P, D]``, ``patch_valid [B, N, P]``, ``previous [B, N]`` (slot of the same group in the
        previous frame, -1: none) → ``[B, N]`` scores in ``(0, 1)``."""
        rows, width, slots, dim = patches.shape
        pooled = self.pooler(patches.reshape(-1, slots, dim), patch_valid.reshape(-1, slots)).view(rows, width, dim)
        before = pooled.gather(1, previous.clamp(min=0).unsqueeze(-1).expand(-1, -1, dim))
        before = before * (previous >= 0).unsqueeze(-1).to(before.dtype)
        return torch.sigmoid(self.mlp(torch.cat([before, pooled], dim=-1)))


@dataclass
class _Layout:
    """Where each group sits in its video: frame, first frame, the previous frame's slot."""

    frame: Tensor  # [B, N] long: t of each group (-1 at padding slots)
    first: Tensor  # [B, N] bool: live groups of the row's first frame
    later: Tensor  # [B, N] bool: live groups of a video's later frames (the prunable ones)
    previous: Tensor  # [B, N] long: slot of the same (h, w) in frame t - 1 of the row, -1 when absent


@register
class STTSMethod(TokenMethod):
    name = "stts"
    kind = "learned"
    config_class = STTSConfig
    site_kinds = ("vit",)
    needs_group_patches = True  # the driver fills state.group_patches / group_patch_valid
    trains_by_removal = True  # MLLMScorerTrainer trains it in gather mode: the key bias carries the gradient
    description = (
        "STTS (Molmo2): spatio-temporal scorer of pooled patch groups in the vision tower; log(score) biases the "
        "next block's keys, then the first frame and the video's best groups stay (learned)"
    )

    def __init__(self, config: STTSConfig | None = None):
        super().__init__(config)
        cfg = self.config
        missing = [name for name in ("hidden_size", "num_heads", "head_dim", "mlp_dim") if getattr(cfg, name) is None]
        if missing:
            raise ValueError(
                f"STTSConfig needs {missing}: build it with STTSMethod.for_backbone(adapter), or load a trained one "
                "(ts.apply(model, 'path/to/artifact'))."
            )
        if cfg.sites is None:
            cfg.sites = ["vit.3"]
        self.scorer = TemporalTokenScorer(
            cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.mlp_dim, cfg.initializer_range
        )
        self._aux_sum: Tensor | None = None  # training: summed squared errors of this forward's tower calls
        self._aux_count = 0
        self.last_scores: Tensor | None = None  # [B, N] raw sigmoid scores of the last call (detached)
        self.last_rescaled: Tensor | None = None  # [B, N] what the bias is the log of
        self.seen_patches_per_group: int | None = None  # the last call's P (what analytic_flops charges)

    @classmethod
    def for_backbone(cls, adapter, config: STTSConfig | None = None) -> STTSMethod:
        config = replace(config) if config is not None else STTSConfig()  # the caller's config stays as given
        model = adapter.model
        family = adapter.family
        tower = family.tower(model).config
        width = int(getattr(tower, "embed_dim", None) or tower.hidden_size)  # Qwen2-VL's tower width is embed_dim
        if config.hidden_size is None:
            config.hidden_size = width
        if config.num_heads is None:
            config.num_heads = int(tower.num_attention_heads)
        if config.head_dim is None:
            config.head_dim = int(getattr(tower, "head_dim", None) or config.hidden_size // config.num_heads)
        if config.mlp_dim is None:
            config.mlp_dim = int(getattr(tower, "intermediate_size", None) or width * int(tower.mlp_ratio))
        if family.packed_tower:
            # a family without merge_size takes its groups from the processor (Molmo2's 3x3 video pooling window):
            # the default stays
            with contextlib.suppress(NotImplementedError):
                config.patches_per_group = int(family.merge_size(model)) ** 2
        if config.sites is None:
            config.sites = ["vit.3"]
        check_vit_site(config, family.last_vit_site(model))
        return cls(config)

    def default_mllm_sites(self, adapter) -> list[str]:
        return list(self.config.sites)

    # -- scoring ----------------------------------------------------------------------------------
    def layout(self, state: TokenState) -> _Layout:
        """Each live group's frame, the row's first frame, its later frames (videos only) and previous-frame slot."""
        coords = require(state, "coords", self.name)
        live = state.prunable
        frame = torch.where(live, coords[..., 0], -1)
        big = torch.iinfo(frame.dtype).max
        first_t = torch.where(live, frame, big).amin(dim=1, keepdim=True)
        first = live & (frame == first_t)
        video = live.any(dim=1, keepdim=True) & (frame.amax(dim=1, keepdim=True) > first_t)
        if state.kind is not None:  # only videos are pruned; Molmo2's image crops also span t = 0 / 1
            video = video & (state.kind == VIDEO).any(dim=1, keepdim=True)
        later = live & ~first & video
        # previous-frame slot by (t - 1, h, w): a lookup table per row, whatever order the groups come in
        rows, width = live.shape
        h, w = coords[..., 1].clamp(min=0), coords[..., 2].clamp(min=0)
        height, cols = int(h.max()) + 1 if h.numel() else 1, int(w.max()) + 1 if w.numel() else 1
        frames = int(frame.max()) + 2 if frame.numel() else 1
        key = (frame.clamp(min=0) * height + h) * cols + w
        table = torch.full((rows, frames * height * cols), -1, dtype=torch.long, device=live.device)
        slots = torch.arange(width, device=live.device).expand(rows, width)
        table.scatter_(1, torch.where(live, key, table.shape[1] - 1), torch.where(live, slots, -1))
        table[:, -1] = -1  # the slot every padding entry was written to
        wanted = torch.where(live & (frame > 0), key - height * cols, table.shape[1] - 1)
        previous = torch.where(live & (frame > 0), table.gather(1, wanted), -1)
        return _Layout(frame=frame, first=first, later=later, previous=previous)

    def scores(self, state: TokenState, layout: _Layout | None = None) -> Tensor:
        """``[B, N]`` sigmoid scores of the live groups (0 elsewhere), the scorer's raw output."""
        layout = layout or self.layout(state)
        patches = require(state, "group_patches", self.name)
        valid = state.group_patch_valid
        if valid is None:
            valid = torch.ones(patches.shape[:3], dtype=torch.bool, device=patches.device)
        live = state.prunable
        dtype = self.scorer.mlp.w1.weight.dtype
        patches = patches.to(dtype) * valid.unsqueeze(-1).to(dtype)
        self.seen_patches_per_group = int(patches.shape[2])
        scores = self.scorer(patches, valid & live.unsqueeze(-1), layout.previous)
        return torch.where(live, scores, torch.zeros_like(scores))

    def score(self, state: TokenState) -> Tensor:
        return self.scores(state)

    def rescale(self, scores: Tensor, state: TokenState, layout: _Layout) -> Tensor:
        """Scores min-max rescaled to ``[rescale_min, 1]`` per frame (or per row of groups, ``rescale_scope``) of each
        video; the first frame, images and padding at 1 (no bias)."""
        cfg = self.config
        coords = state.coords
        scope = layout.frame.clamp(min=0)
        if cfg.rescale_scope == "row":
            scope = scope * (int(coords[..., 1].max()) + 1) + coords[..., 1].clamp(min=0)
        rows, width = scores.shape
        buckets = int(scope.max()) + 1 if scope.numel() else 1
        key = torch.arange(rows, device=scores.device).unsqueeze(1) * buckets + scope  # [B, N] bucket of each group
        key = torch.where(layout.later, key, rows * buckets)  # one spare bucket for everything not rescaled
        flat, values = key.reshape(-1), scores.reshape(-1)
        low = values.new_full((rows * buckets + 1,), float("inf")).scatter_reduce(0, flat, values, "amin")
        high = values.new_full((rows * buckets + 1,), float("-inf")).scatter_reduce(0, flat, values, "amax")
        low, high = low[flat].view(rows, width), high[flat].view(rows, width)
        rescaled = cfg.rescale_min + (scores - low) * (1.0 - cfg.rescale_min) / (high - low + 1e-6)
        return torch.where(layout.later, rescaled, torch.ones_like(scores))

    def keep_mask(self, scores: Tensor, state: TokenState, layout: _Layout, num_keep: Tensor) -> Tensor:
        """The first frame whole, and of later frames the ``num_keep[b] − first frame`` best by raw score; images
        whole."""
        check_scores(scores.detach().float(), layout.later, self.name, state.site)
        budget = (num_keep.to(scores.device) - layout.first.sum(dim=1)).clamp(min=0)
        ranked = scores.detach().float().masked_fill(~layout.later, float("-inf"))
        order = ranked.argsort(dim=1, descending=True, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        keep_later = layout.later & (rank < budget.unsqueeze(1))
        keep = keep_later | (state.prunable & ~layout.later)  # first frames and images stay whole
        return keep | (state.protected & state.alive)

    def reduce(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        layout = self.layout(state)
        scores = self.scores(state, layout)
        rescaled = self.rescale(scores, state, layout)
        keep = self.keep_mask(scores, state, layout, num_keep)
        self.last_scores, self.last_rescaled = scores.detach(), rescaled.detach()
        if self.training and torch.is_grad_enabled() and self.config.aux_weight > 0:
            self._record_temporal_error(scores, state, layout)
        return KeepDecision(keep, key_bias=torch.log(rescaled))

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        return self.reduce(state, num_keep).keep

    def keep_policy(self, state: TokenState, num_keep: Tensor) -> Tensor:
        raise ValueError(
            "stts trains by removal: its scores reach the loss only as the next block's key bias before the dropped "
            "groups leave (KeepDecision.key_bias), which mask mode does not carry. Run it in gather mode "
            "(MLLMScorerTrainer does so for methods with trains_by_removal)."
        )

    # -- auxiliary temporal loss --------------------------------------------------------------------
    @staticmethod
    def temporal_targets(state: TokenState, layout: _Layout) -> Tensor:
        """``[B, N]`` ``1 − cos`` between each group's concatenated patches and the same group's in the previous frame
        (0 where there is none)."""
        patches = state.group_patches
        flat = F.normalize(
            patches.flatten(2).to(torch.promote_types(patches.dtype, torch.float32)), dim=-1
        )  # [B, N, P·D]
        before = flat.gather(1, layout.previous.clamp(min=0).unsqueeze(-1).expand_as(flat))
        cosine = (flat * before).sum(-1)
        return torch.where(layout.previous >= 0, 1.0 - cosine, torch.zeros_like(cosine))

    def _record_temporal_error(self, scores: Tensor, state: TokenState, layout: _Layout) -> None:
        scored = layout.later & (layout.previous >= 0)
        if not bool(scored.any()):
            return
        target = self.temporal_targets(state, layout)
        error = ((scores.float() - target) ** 2 * scored).sum()
        self._aux_sum = error if self._aux_sum is None else self._aux_sum + error
        self._aux_count += int(scored.sum())

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """Training: ``{"temporal": aux_weight · MSE(score, 1 − cos)}`` over the groups of later video frames in the
        forward passes since the last call (the trainer adds it to the loss); ``{}`` when none had any. Resets."""
        if self._aux_sum is None:
            return {}
        value = self.config.aux_weight * self._aux_sum / max(self._aux_count, 1)
        self._aux_sum, self._aux_count = None, 0
        return {"temporal": value}

    def analytic_flops(self, site) -> float:
        """One image / video at its site (a ``tokensift.flops.SiteShape``: ``v`` groups of ``P`` patches, width ``d``;
        pooling ``H`` heads of ``h``, MLP width ``m``): the group means ``v P d``; projections ``2 v d Hh`` (query),
        ``4 v P d Hh`` (keys, values), ``2 v Hh d`` (output); attention ``4 v P Hh`` plus its softmax ``3 v H P``;
        the MLP ``2 v (2d m + m² + m)`` and its activations ``8 v m``; the sigmoid, rescale and log ``6 v``."""
        cfg = self.config
        v, d = site.prunable, site.hidden
        if v == 0:
            return 0.0
        p = self.seen_patches_per_group or cfg.patches_per_group
        inner, m = cfg.num_heads * cfg.head_dim, cfg.mlp_dim
        pooling = v * p * d + site.matmul(v, d, inner) + 2 * site.matmul(v * p, d, inner) + site.matmul(v, inner, d)
        attention = 4.0 * v * p * inner + 3.0 * v * cfg.num_heads * p
        mlp = site.matmul(v, 2 * d, m) + site.matmul(v, m, m) + site.matmul(v, m, 1) + 8.0 * v * m
        return float(pooling + attention + mlp + 6.0 * v)
