"""Signals the multimodal methods share: the last text token, its attention, cosine similarities."""

from __future__ import annotations

import torch
from torch import Tensor

from tokensift.state import TokenState


def require(state: TokenState, field: str, method: str) -> Tensor:
    """``state.<field>``, or a clear error when the site does not provide it."""
    value = getattr(state, field)
    if value is None:
        raise ValueError(
            f"{method} needs state.{field}, which site {state.site!r} did not provide; "
            "run it at one of its own sites (ts.methods() lists them)."
        )
    return value


def last_text_index(state: TokenState) -> Tensor:
    """``[B]`` index of each sample's last text token: the one whose next-token prediction comes first."""
    text = state.protected & state.alive
    positions = torch.arange(text.shape[1], device=text.device).expand_as(text)
    return torch.where(text, positions, -1).amax(dim=1).clamp(min=0)


def last_text_attention(state: TokenState, method: str) -> Tensor:
    """``[B, N]`` attention the last text token pays each token, averaged over heads (FastV's signal)."""
    attention = require(state, "attention", method)  # [B, H, N, N]
    rows = last_text_index(state)
    batch = torch.arange(attention.shape[0], device=attention.device)
    return attention[batch, :, rows, :].float().mean(dim=1)


def cosine_similarity_matrix(features: Tensor) -> Tensor:
    """``[..., N, N]`` cosine similarity between the rows of ``features`` ``[..., N, D]``."""
    normed = features.float() / features.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return normed @ normed.transpose(-1, -2)
