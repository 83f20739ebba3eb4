"""KTV: keyframes by clustering frame features, then key tokens within each keyframe (AAAI 2026, hktk07/KTV).

Per video, at ``pre_llm`` (on the projected features the LLM reads):

1. **Keyframes.** Each frame's feature is the mean of its tokens (KTV clusters DINOv2 frame embeddings, which a
   multimodal LLM does not carry). The frames are clustered with k-means into ``keyframes`` clusters (more when the
   budget needs more frames' tokens, never more than the video's frames); each cluster's keyframe is its member
   nearest its centre. All other frames are dropped.
2. **Token budget per keyframe.** KTV ranks the keyframes by CLIP similarity to the question and gives the best
   twice the share and the last half of it (6 frames, 1008 tokens: 288, 4 x 144, 72; 12 frames: 2 / 8 / 2).
   ``question_ranking`` ranks by cosine similarity of the frame feature to the mean text embedding; without it every
   keyframe gets the same share.
3. **Key tokens.** Within a keyframe each token scores ``rate · minmax(importance) + (1 - rate) · (1 -
   minmax(redundancy))``: importance is the vision tower's attention ([CLS] attention in LLaVA, the attention a
   token receives without [CLS]), redundancy its mean cosine similarity to the frame's other tokens; the best
   tokens of each keyframe's share are kept (KTV's ``cls_new_token_sim``, ``rate`` 0.2).

An image is a one-frame video: its keyframe is itself and its tokens are picked by step 3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.learned import check_bool, check_float, check_int
from tokensift.scorers.multimodal import cosine_similarity_matrix, require
from tokensift.scorers.registry import register
from tokensift.scorers.video import proportional_counts, sample_videos, weighted_counts
from tokensift.state import TokenState


@dataclass
class KTVConfig(MethodConfig):
    """KTV's defaults: 6 keyframes, ``rate`` 0.2, question-ranked token shares."""

    keyframes: int = field(
        default=6,
        metadata={
            "help": "Clusters of frames, one keyframe each (KTV's --num_frames); more if the budget "
            "holds more than that many frames' tokens."
        },
    )
    rate: float = field(
        default=0.2, metadata={"help": "Weight of attention importance against non-redundancy of a token (--rate)."}
    )
    question_ranking: bool = field(
        default=True,
        metadata={"help": "Rank keyframes by similarity to the text: the best gets twice the tokens, the last half."},
    )
    iterations: int = field(default=100, metadata={"help": "Most k-means (Lloyd) iterations per video."})

    def __post_init__(self) -> None:
        check_int(self, "keyframes")
        check_float(self, "rate", low=0.0, high=1.0, low_open=False)
        check_bool(self, "question_ranking")
        check_int(self, "iterations")


def kmeans_keyframes(features: Tensor, clusters: int, iterations: int) -> Tensor:
    """Ascending indices of ``clusters`` keyframes among ``features`` ``[T, D]``: k-means (Lloyd) from a farthest-
    point start (the frame farthest from the mean, then each next the farthest from those chosen), then per cluster
    its member nearest its centre."""
    x = features.float()
    frames = x.shape[0]
    if clusters >= frames:
        return torch.arange(frames, device=x.device)
    chosen = [int((x - x.mean(0)).norm(dim=-1).argmax())]
    nearest = (x - x[chosen[0]]).norm(dim=-1)
    for _ in range(clusters - 1):
        chosen.append(int(nearest.argmax()))
        nearest = torch.minimum(nearest, (x - x[chosen[-1]]).norm(dim=-1))
    centres = x[chosen]
    label = torch.cdist(x, centres).argmin(dim=1)
    for _ in range(iterations):
        sums = torch.zeros_like(centres).index_add_(0, label, x)
        sizes = torch.bincount(label, minlength=clusters).unsqueeze(1)
        centres = torch.where(sizes > 0, sums / sizes.clamp(min=1), centres)
        new_label = torch.cdist(x, centres).argmin(dim=1)
        if torch.equal(new_label, label):
            break
        label = new_label
    distance = torch.cdist(x, centres)  # [T, clusters]
    keyframes = []
    for c in range(clusters):
        members = (label == c).nonzero().squeeze(1)
        if members.numel():
            # nearest the centre; equal distances (a two-frame cluster's midpoint) go to the earlier frame, which float
            # rounding would otherwise pick at random
            gap = distance[members, c]
            keyframes.append(int(members[(gap <= gap.min() + 1e-5 * gap.max().clamp(min=1.0)).nonzero()[0, 0]]))
    taken = set(keyframes)
    # an emptied cluster (only when frames coincide) is replaced by the frame farthest from the keyframes so far
    while len(keyframes) < clusters:
        gap = torch.cdist(x, x[keyframes]).amin(dim=1)
        gap[list(taken)] = -1.0
        keyframes.append(int(gap.argmax()))
        taken.add(keyframes[-1])
    return torch.tensor(sorted(keyframes), device=x.device)


def rank_weights(order: Tensor) -> list[float]:
    """KTV's token shares by rank (``order[i]``: keyframe ``i``'s rank, 0 best): the top sixth twice the share, the
    bottom sixth half of it (6 keyframes: 2, 1, 1, 1, 1, 0.5; 12: two each end)."""
    count = order.numel()
    ends = round(count / 6)
    top = max(1, ends)
    return [2.0 if r < top else 0.5 if r >= count - ends and ends > 0 else 1.0 for r in order.tolist()]


def key_token_scores(features: Tensor, importance: Tensor, rate: float) -> Tensor:
    """KTV's ``cls_new_token_sim`` score of one frame's tokens ``[P, D]``: ``rate · minmax(importance) + (1 - rate) ·
    (1 - minmax(mean cosine similarity to the frame's other tokens))``."""
    tokens = features.shape[0]
    if tokens == 1:
        return torch.ones(1, device=features.device)
    similarity = cosine_similarity_matrix(features)
    redundancy = (similarity.sum(dim=1) - similarity.diagonal()) / (tokens - 1)
    return rate * minmax(importance.float()) + (1 - rate) * (1 - minmax(redundancy))


def minmax(values: Tensor) -> Tensor:
    """``values`` rescaled to [0, 1]; all equal: zeros (KTV would divide by zero)."""
    values = values.detach()  # a ranking signal only
    spread = values.max() - values.min()
    return (values - values.min()) / spread if float(spread) > 0 else torch.zeros_like(values)


@register
class KTVMethod(TokenMethod):
    name = "ktv"
    config_class = KTVConfig
    needs_tower_attention = True
    site_kinds = ("pre_llm",)
    description = "keyframes by k-means over frame features + key tokens by importance and non-redundancy (KTV)"

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        importance = require(state, "tower_attention", self.name)
        keep = state.protected & state.alive
        for b in range(keep.shape[0]):
            videos = sample_videos(state, b, self.name)
            sizes = [v.numel() for v in videos]
            budget = min(int(num_keep[b]), sum(sizes))
            for slots, count in zip(videos, proportional_counts(budget, sizes), strict=True):
                if count > 0:
                    text = state.text_mean[b] if state.text_mean is not None else None
                    keep[b, self._select_video(state.hidden[b], importance[b], slots, count, text)] = True
        return keep

    def _select_video(self, hidden: Tensor, importance: Tensor, slots: Tensor, count: int, text: Tensor | None):
        """State positions kept of one video (``slots`` ``[T, P]``), ``count`` of them."""
        frames, per_frame = slots.shape
        clusters = min(frames, count, max(self.config.keyframes, -(-count // per_frame)))
        frame_features = hidden[slots].float().mean(dim=1)  # [T, D]
        keyframes = kmeans_keyframes(frame_features, clusters, self.config.iterations)
        if self.config.question_ranking and text is not None and keyframes.numel() > 1:
            similarity = cosine_similarity_matrix(torch.cat([text.float().unsqueeze(0), frame_features[keyframes]]))
            rank = similarity[0, 1:].argsort(descending=True, stable=True).argsort()
            weights = rank_weights(rank)
        else:
            weights = [1.0] * keyframes.numel()
        shares = weighted_counts(count, weights, [per_frame] * keyframes.numel())
        kept = []
        for frame, share in zip(keyframes.tolist(), shares, strict=True):
            rows = slots[frame]
            score = key_token_scores(hidden[rows], importance[rows], self.config.rate)
            kept.append(rows[score.argsort(descending=True, stable=True)[:share]])
        return torch.cat(kept)

    def analytic_flops(self, site) -> float:
        """FLOPs at a ``pre_llm`` site (a ``tokensift.flops.SiteShape``, one sample) beyond the tower's captured map
        (charged by the bench for ``needs_tower_attention``), an upper bound where frames and keyframes are
        data-dependent: frame features (token means) ``v d``; k-means on at most ``v`` frames, ``iterations`` rounds
        of distances to ``c = min(k, keyframes)`` centres ``3 v c d``; the keyframes' cosine similarity matrices, at
        most ``v`` tokens in all, ``3 v d + 2 v² d``."""
        v, k, d = site.prunable, min(site.keep, site.prunable), site.hidden
        if k == 0 or k == v:
            return 0.0
        clusters = min(k, self.config.keyframes)
        return v * d + self.config.iterations * 3.0 * v * clusters * d + site.cosine_matrix(v, d)
