"""HoliTom: holistic token merging for video LLMs, before the LLM (temporal + spatial) and inside it.

Before the LLM (``pre_llm``, on the projected features the LLM reads), per video (HoliTom's
``prepare_inputs_labels_for_multimodal``, ``select_static_windows``, ``get_static_dynamic_features``, ``holitom``):

1. **Global redundancy-aware temporal segmentation.** ``sim[t, p]`` is the cosine similarity of token ``p`` in
   frames ``t`` and ``t + 1``. A window of frames ``[s, e]`` makes the positions whose similarity stays above
   ``tau`` over the whole window *static*; collapsing them into one saves ``(e - s) x #static`` tokens. A dynamic
   programme over the frames picks the segmentation (windows of at most ``max_window`` frames, single frames
   allowed) that saves the most tokens.
2. **Temporal merging.** In a window of two or more frames, each static position becomes its mean over the window.
3. **Spatial merging.** The budget is shared over the pieces in proportion to their sizes (a window's static
   tokens; each frame's dynamic tokens), as HoliTom rescales its retain ratio by what the segmentation saved.
   Static tokens are clustered with DPC-KNN (density peaks over ``k`` nearest neighbours); each cluster centre
   becomes ``beta · centre + (1 - beta) · mean(other members)`` and is written into the window's first frame at the
   centre's position. Each frame's dynamic tokens keep ``1 - contextual_fraction`` of their share by vision-tower
   attention (the attention each token receives, VisionZip's signal) and cluster the rest with DPC-KNN the same
   way (HoliTom's ``D``, 0 by default: every dynamic token kept is an attention-ranked one).

Inside the LLM (``llm.<k>``, HoliTom's ``Qwen2Model_holitom``): the visual tokens the last text token attends to
most at layer ``k - 1`` (averaged over heads) are kept; every other visual token is folded into the kept one it is
most cosine-similar to, in sequence order, by HoliTom's running pairwise mean ``h <- (h + x) / 2``. HoliTom's
``k`` is 18 of LLaVA-OneVision-7B's 28 layers; the default site is that share of the model's depth.

Budget: HoliTom's ``RETAIN_RATIO`` is the share entering the LLM and its inner merge keeps ``1 - r`` (r = 0.5) of
those from layer ``k`` on. ``holitom_keep_ratios(ratio, layer)`` gives that split as a per-site ``keep_ratio``;
a single ``keep_ratio`` is tokensift's budget (the share after the last site, the geometric schedule before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokensift.scorers.base import KeepDecision, MethodConfig, TokenMethod
from tokensift.scorers.learned import check_float, check_int
from tokensift.scorers.multimodal import last_text_attention, require
from tokensift.scorers.registry import register
from tokensift.scorers.video import proportional_counts, sample_videos
from tokensift.state import TokenState

# HoliTom's scripts: HOLITOM_k=18 on LLaVA-OneVision-7B's 28 decoder layers
INNER_LAYER_SHARE = 18 / 28


@dataclass
class HoliTomConfig(MethodConfig):
    """HoliTom's defaults (its environment variables in brackets)."""

    tau: float = field(
        default=0.8, metadata={"help": "Similarity above which a position is static across adjacent frames [T]."}
    )
    beta: float = field(
        default=0.6, metadata={"help": "Weight of a cluster centre against the mean of its other members [BETA]."}
    )
    neighbours: int = field(default=7, metadata={"help": "Nearest neighbours of DPC-KNN's local density [K]."})
    contextual_fraction: float = field(
        default=0.0,
        metadata={"help": "Share of each frame's dynamic budget merged by DPC-KNN instead of kept by attention [D]."},
    )
    max_window: int = field(default=1024, metadata={"help": "Most frames in one temporal window [MAX_WINDOW_SIZE]."})
    layer: int | None = field(
        default=None,
        metadata={"help": "Decoder layer of the inner merge (site llm.<layer>); null: 18/28 of the LLM's depth."},
    )

    def __post_init__(self) -> None:
        check_float(self, "tau", low=-1.0, high=1.0)
        check_float(self, "beta", low=0.0, high=1.0, low_open=False)
        check_int(self, "neighbours")
        check_float(self, "contextual_fraction", low=0.0, high=1.0, low_open=False)
        check_int(self, "max_window", minimum=2)
        check_int(self, "layer", optional=True)


def holitom_keep_ratios(keep_ratio: float, layer: int, inner_merge: float = 0.5) -> dict[str, float]:
    """HoliTom's budget split as a per-site ``keep_ratio``: ``keep_ratio`` of the visual tokens enter the LLM
    (its ``RETAIN_RATIO``) and ``1 - inner_merge`` of those survive layer ``layer`` (its ``HOLITOM_r``)."""
    if not 0.0 <= inner_merge < 1.0:
        raise ValueError(f"inner_merge must be in [0, 1), got {inner_merge!r}.")
    return {"pre_llm": keep_ratio, f"llm.{layer}": keep_ratio * (1.0 - inner_merge)}


def inner_layer(num_layers: int) -> int:
    """HoliTom's inner-merge layer for an LLM of ``num_layers`` layers (18 of 28), within 1 .. num_layers - 1."""
    return min(max(1, round(num_layers * INNER_LAYER_SHARE)), num_layers - 1)


# -- before the LLM ------------------------------------------------------------------------------------------


def static_windows(sim: Tensor, tau: float, max_window: int) -> list[tuple[int, int]]:
    """HoliTom's segmentation of ``T`` frames (``sim``: ``[T - 1, P]`` adjacent-frame similarities) into windows
    ``(start, end)`` that maximise the tokens saved by collapsing static positions (dynamic programme)."""
    frames = sim.shape[0] + 1
    above = (sim > tau).cpu()
    # saved[s, e]: tokens saved by the window [s, e]: (e - s) x positions static across all of it
    saved = torch.zeros(frames, frames)
    for start in range(frames - 1):
        static = torch.cumprod(above[start:].long(), dim=0).sum(dim=1).float()  # windows [start, start + 1 + m]
        saved[start, start + 1 :] = static * torch.arange(1, frames - start, dtype=torch.float32)
    best = [0.0] * frames
    window_start = [0] * frames
    for end in range(frames):
        value, start = (best[end - 1] if end > 0 else 0.0), end
        for size in range(2, min(end + 1, max_window) + 1):
            before = end - size
            candidate = (best[before] if before >= 0 else 0.0) + float(saved[before + 1, end])
            if candidate > value:  # strictly better: ties keep the shorter window, as HoliTom
                value, start = candidate, before + 1
        best[end], window_start[end] = value, start
    windows, end = [], frames - 1
    while end >= 0:
        windows.append((window_start[end], end))
        end = window_start[end] - 1
    return windows[::-1]


def dpc_knn_centres(features: Tensor, count: int, neighbours: int) -> tuple[Tensor, Tensor]:
    """DPC-KNN cluster centres: ``count`` indices among ``features`` ``[n, d]`` and the distances ``[n, n]``.

    Local density ``exp(-mean of the squared distances to the k nearest)`` (itself included), distance to the
    nearest denser token (the densest: the largest distance), centres by ``density x that distance``; distances
    are Euclidean over ``sqrt(d)``, as HoliTom's ``cluster_dpc_knn``. Deterministic: ties in density go to the
    earlier token instead of HoliTom's random noise."""
    x = features.float()
    distance = torch.cdist(x, x) / math.sqrt(x.shape[-1])
    nearest = distance.topk(min(neighbours, x.shape[0]), dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    # [i, j]: j denser than i; equal densities (duplicate tokens) rank the earlier token denser, where HoliTom adds
    # 1e-6 uniform noise: otherwise every token of a tie would count as a peak
    index = torch.arange(x.shape[0], device=x.device)
    same = density.unsqueeze(0) == density.unsqueeze(1)
    denser = (density.unsqueeze(0) > density.unsqueeze(1)) | (same & (index.unsqueeze(0) < index.unsqueeze(1)))
    parent = torch.where(denser, distance, distance.max()).amin(dim=-1)
    score = parent * density
    return score.argsort(descending=True, stable=True)[:count], distance


def merge_into_centres(features: Tensor, centres: Tensor, distance: Tensor, beta: float) -> Tensor:
    """``[len(centres), d]``: each centre ``beta · centre + (1 - beta) · mean(members)`` over the tokens nearest to
    it (itself excluded); a centre without members keeps its features (HoliTom's ``merge_tokens_by_clustering``)."""
    n = features.shape[0]
    others = torch.ones(n, dtype=torch.bool, device=features.device)
    others[centres] = False
    members = others.nonzero().squeeze(1)
    merged = features[centres].float().clone()
    if members.numel() == 0:
        return merged
    cluster = distance[members][:, centres].argmin(dim=1)
    sums = torch.zeros_like(merged).index_add_(0, cluster, features[members].float())
    sizes = torch.bincount(cluster, minlength=centres.numel())
    has = sizes > 0
    merged[has] = beta * merged[has] + (1 - beta) * sums[has] / sizes[has].unsqueeze(1)
    return merged


@register
class HoliTomMethod(TokenMethod):
    name = "holitom"
    config_class = HoliTomConfig
    merges = True
    needs_tower_attention = True
    needs_attention = True
    site_kinds = ("pre_llm", "llm")
    description = "temporal segmentation + static / spatial merging before the LLM, attention merge inside (HoliTom)"

    def default_mllm_sites(self, adapter) -> list[str]:
        layer = self.config.layer if self.config.layer is not None else inner_layer(adapter.num_layers)
        return ["pre_llm", f"llm.{layer}"]

    def reduce(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        if state.site == "pre_llm":
            return self._merge_videos(state, num_keep)
        return self._merge_in_llm(state, num_keep)

    # -- pre_llm ----------------------------------------------------------------------------------------
    def _merge_videos(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        importance = require(state, "tower_attention", self.name)
        keep = state.protected & state.alive
        hidden = state.hidden.clone()
        for b in range(hidden.shape[0]):
            videos = sample_videos(state, b, self.name)
            sizes = [v.numel() for v in videos]
            budget = min(int(num_keep[b]), sum(sizes))
            for slots, count in zip(videos, proportional_counts(budget, sizes), strict=True):
                if count > 0:
                    self._merge_video(state.hidden[b], importance[b], slots, count, keep[b], hidden[b])
        return KeepDecision(keep, hidden)

    def _merge_video(self, source: Tensor, importance: Tensor, slots: Tensor, count: int, keep: Tensor, out: Tensor):
        """A video (``slots`` ``[T, P]``) down to ``count`` tokens, ``keep`` / ``out``: its sample's rows; in place."""
        frames = source[slots].float()  # [T, P, D]
        sim, windows = None, [(0, 0)]
        if slots.shape[0] > 1:
            normed = frames / frames.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            sim = (normed[:-1] * normed[1:]).sum(dim=-1)  # [T - 1, P]
            windows = static_windows(sim, self.config.tau, self.config.max_window)
        pieces = self._pieces(sim, windows, slots.shape[1], slots.device)
        if sum(p[2].numel() for p in pieces) < count:  # room for more than the distinct tokens: no collapsing
            pieces = self._pieces(None, [(t, t) for t in range(slots.shape[0])], slots.shape[1], slots.device)
        counts = proportional_counts(count, [p[2].numel() for p in pieces])
        for (is_static, where, positions), share in zip(pieces, counts, strict=True):
            if share == 0:
                continue
            if is_static:
                start, end = where
                features = frames[start : end + 1, positions].mean(dim=0)
                centres, distance = dpc_knn_centres(features, share, min(self.config.neighbours, share))
                kept = slots[start, positions[centres]]
                out[kept] = merge_into_centres(features, centres, distance, self.config.beta).to(out.dtype)
                keep[kept] = True
            else:
                rows = slots[where, positions]
                self._merge_frame(frames[where, positions], importance[rows], rows, share, keep, out)

    def _pieces(self, sim: Tensor | None, windows: list[tuple[int, int]], per_frame: int, device) -> list[tuple]:
        """``(static?, window or frame, positions)``: a window's static positions, then each of its frames' others."""
        pieces = []
        everywhere = torch.ones(per_frame, dtype=torch.bool, device=device)
        for start, end in windows:
            static = (sim[start:end] > self.config.tau).all(dim=0) if end > start else ~everywhere
            if bool(static.any()):
                pieces.append((True, (start, end), static.nonzero().squeeze(1)))
            for frame in range(start, end + 1):
                if bool((~static).any()):
                    pieces.append((False, frame, (~static).nonzero().squeeze(1)))
        return pieces

    def _merge_frame(self, features: Tensor, importance: Tensor, slots: Tensor, share: int, keep: Tensor, out: Tensor):
        """A frame's dynamic tokens: the most attended kept, the rest clustered into contextual tokens."""
        contextual = share - round(share * (1 - self.config.contextual_fraction))
        order = importance.float().argsort(descending=True, stable=True)
        dominant = order[: share - contextual]
        keep[slots[dominant]] = True
        if contextual == 0:
            return
        rest = order[share - contextual :].sort().values
        centres, distance = dpc_knn_centres(features[rest], contextual, min(self.config.neighbours, contextual))
        kept = slots[rest[centres]]
        out[kept] = merge_into_centres(features[rest], centres, distance, self.config.beta).to(out.dtype)
        keep[kept] = True

    # -- llm.<k> ----------------------------------------------------------------------------------------
    def _merge_in_llm(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        keep = state.protected & state.alive
        hidden = state.hidden.clone()
        top = self.inner_keep(state, num_keep)
        for b in range(hidden.shape[0]):
            if top[b].numel() == 0:
                continue
            keep[b, top[b]] = True
            hidden[b] = fold_into_most_similar(state.hidden[b], top[b], keep[b], state.prunable[b])
        return KeepDecision(keep, hidden)

    def inner_keep(self, state: TokenState, num_keep: Tensor) -> list[Tensor]:
        """Per sample, the state positions of the visual tokens kept at ``llm.<k>``: the ``num_keep[b]`` the last text
        token attends to most at layer ``k - 1`` (averaged over heads); the others are folded into them."""
        attention = last_text_attention(state, self.name)
        top = []
        for b in range(state.hidden.shape[0]):
            visual = state.prunable[b].nonzero().squeeze(1)
            order = attention[b, visual].argsort(descending=True, stable=True)
            top.append(visual[order[: min(int(num_keep[b]), visual.numel())]])
        return top

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``, one sample) beyond the captured maps (the tower's at
        ``pre_llm``, layer ``k - 1``'s at ``llm.<k>``, charged by the bench for their capabilities).

        ``pre_llm``, an upper bound (the split into frames, windows and pieces is data-dependent): the adjacent-frame
        cosine similarities of all ``v`` tokens ``5 v d``; DPC-KNN as if all ``v`` tokens formed one piece, distances
        ``3 v² d`` and the merge ``v d``. ``llm.<k>``: the last text token's row averaged over heads ``H n``, the
        cosine similarity of the ``v - k`` folded tokens to the ``k`` kept ``3 v d + 2 (v - k) k d`` and the folds
        ``2 (v - k) d``."""
        v, k, d = site.prunable, min(site.keep, site.prunable), site.hidden
        if k == 0 or k == v:
            return 0.0
        if site.site == "pre_llm":
            return 5.0 * v * d + 3.0 * v * v * d + v * d
        return float(site.heads * site.tokens) + 3.0 * v * d + site.matmul(v - k, d, k) + 2.0 * (v - k) * d


def fold_into_most_similar(hidden: Tensor, top: Tensor, keep: Tensor, visual: Tensor) -> Tensor:
    """One sample's ``hidden`` ``[N, D]`` with every dropped visual token folded into the kept visual token (of
    ``top``) it is most cosine-similar to, in sequence order: ``h <- (h + x) / 2`` (HoliTom's in-place loop, whose
    similarities are computed before any fold)."""
    dropped = (visual & ~keep).nonzero().squeeze(1)
    out = hidden.clone()
    if dropped.numel() == 0:
        return out
    x = hidden.float()
    normed = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    target = top[(normed[dropped] @ normed[top].T).argmax(dim=1)]
    folded = x[top].clone()
    slot_of = {int(t): i for i, t in enumerate(top.tolist())}
    for source, into in zip(dropped.tolist(), target.tolist(), strict=True):
        i = slot_of[into]
        folded[i] = (folded[i] + x[source]) / 2
    out[top] = folded.to(out.dtype)
    return out
