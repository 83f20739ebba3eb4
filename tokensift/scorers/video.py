"""What the video methods (``holitom``, ``ktv``) share: a sample's videos as frame x token grids, budget shares.

A multimodal site's state carries, per visual token, its ``image_id`` (which image or video of the batch) and
``coords`` (t, h, w) in that image's token grid. An image is a video of one frame. ``sample_videos`` returns,
for one sample, each video's prunable tokens as a ``[T, P]`` grid of state positions (frames in time order,
tokens row-major within a frame); frames must be whole, so the methods run where nothing was pruned yet
(``pre_llm``). An image made of views of different sizes (Molmo2's low-res view and high-res crops) becomes one
one-frame grid per view.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensift.state import TokenState


def sample_videos(state: TokenState, b: int, method: str) -> list[Tensor]:
    """Sample ``b``'s images / videos among its prunable tokens, in ``image_id`` order: ``[T, P]`` state positions
    (frames of different token counts: one ``[1, P_t]`` grid each)."""
    if state.image_id is None or state.coords is None:
        raise ValueError(
            f"{method} needs each visual token's image_id and (t, h, w) coords, which site {state.site!r} did "
            "not provide; run it at pre_llm of a multimodal LLM."
        )
    prunable = state.prunable[b]
    ids = state.image_id[b]
    videos = []
    for video in torch.unique(ids[prunable]).tolist():
        slots = (prunable & (ids == video)).nonzero().squeeze(1)
        t, h, w = state.coords[b, slots].unbind(-1)
        width, height = int(w.max()) + 1, int(h.max()) + 1
        order = (t * height * width + h * width + w).argsort(stable=True)
        slots, t = slots[order], t[order]
        frames = torch.unique_consecutive(t, return_counts=True)[1]
        if bool((frames == frames[0]).all()):
            videos.append(slots.view(frames.numel(), int(frames[0])))
        else:  # views of different sizes (Molmo2's image: a low-res view and high-res crops): each its own image
            videos.extend(view.unsqueeze(0) for view in slots.split(frames.tolist()))
    return videos


def proportional_counts(total: int, sizes: list[int]) -> list[int]:
    """``total`` split over parts of ``sizes`` in proportion (largest remainder, ties to the earlier part); each
    part gets at most its size. ``total`` must not exceed ``sum(sizes)``."""
    return weighted_counts(total, [float(s) for s in sizes], sizes)


def weighted_counts(total: int, weights: list[float], caps: list[int]) -> list[int]:
    """``total`` split over parts by ``weights`` (largest remainder), each part at most its cap: what a capped part
    cannot take goes to the others in proportion to their weights, until ``total`` is placed."""
    if total > sum(caps):
        raise ValueError(f"cannot place {total} tokens in parts holding {sum(caps)}")
    counts = [0] * len(caps)
    left = total
    while left > 0:
        open_parts = [i for i, cap in enumerate(caps) if counts[i] < cap and weights[i] > 0]
        if not open_parts:  # only zero-weight parts have room: fill them in order
            open_parts = [i for i, cap in enumerate(caps) if counts[i] < cap]
            weight_of = {i: 1.0 for i in open_parts}
        else:
            weight_of = {i: weights[i] for i in open_parts}
        weight_sum = sum(weight_of.values())
        shares = {i: left * weight_of[i] / weight_sum for i in open_parts}
        room = {i: caps[i] - counts[i] for i in open_parts}
        base = {i: min(room[i], math.floor(shares[i] + 1e-9)) for i in open_parts}
        extra = left - sum(base.values())
        # largest remainder first, ties to the earlier part; a part only takes what it has room for
        by_remainder = sorted(open_parts, key=lambda i: (-(shares[i] - math.floor(shares[i] + 1e-9)), i))
        for i in by_remainder:
            if extra == 0:
                break
            if base[i] < room[i]:
                base[i] += 1
                extra -= 1
        for i in open_parts:
            counts[i] += base[i]
        left = total - sum(counts)
    return counts
