"""ToMe: bipartite soft matching on the block's keys, merged by size-weighted averaging.

Tokens alternate into sets A (even positions) and B (odd); each A token finds its most similar B token
(cosine of head-averaged keys) and the ``r`` most similar pairs merge into their B token. A site that
must remove more than one round allows (at most |A|) runs several rounds. Merged tokens carry their
size, and later blocks use proportional attention (``+ log size`` on the keys), as ToMe does. The
merged token stays at its B anchor's position (and so keeps its original index), and the sequence stays in
original order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import KeepDecision, MethodConfig, TokenMethod, num_prunable_alive
from tokensift.scorers.registry import register
from tokensift.state import TokenState


@dataclass
class ToMeConfig(MethodConfig):
    pass


def bipartite_merge(
    hidden: Tensor, metric: Tensor, size: Tensor, protected: Tensor, orig_index: Tensor, r: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One round of ToMe: merge ``r`` tokens of set A into their best match in set B.

    Returns hidden, metric, size, protected and orig_index of the ``N - r`` remaining tokens, in
    ascending original order. Protected tokens are never merged away nor merged into.
    """
    _b, n, _d = hidden.shape
    if r <= 0:
        return hidden, metric, size, protected, orig_index
    normed = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    a_idx = torch.arange(0, n, 2, device=hidden.device)
    b_idx = torch.arange(1, n, 2, device=hidden.device)
    similarity = normed[:, a_idx] @ normed[:, b_idx].transpose(1, 2)  # [B, |A|, |B|]
    similarity = similarity.masked_fill(protected[:, a_idx].unsqueeze(-1), float("-inf"))
    similarity = similarity.masked_fill(protected[:, b_idx].unsqueeze(1), float("-inf"))
    best, best_b = similarity.max(dim=-1)  # each A token's best B partner
    order = best.argsort(dim=-1, descending=True, stable=True)
    src = order[:, :r]  # positions within A that merge away
    unmerged = order[:, r:]
    dst = best_b.gather(1, src)  # their partners within B

    def merge(values: Tensor, weighted: bool) -> tuple[Tensor, Tensor]:
        weight = size.unsqueeze(-1) if weighted else torch.ones_like(size).unsqueeze(-1)
        a_vals, b_vals = (values * weight)[:, a_idx], (values * weight)[:, b_idx]
        src_vals = a_vals.gather(1, src.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
        b_vals = b_vals.scatter_add(1, dst.unsqueeze(-1).expand(-1, -1, values.shape[-1]), src_vals)
        keep_a = a_vals.gather(1, unmerged.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
        return keep_a, b_vals

    a_size, b_size = size[:, a_idx], size[:, b_idx]
    b_size = b_size.scatter_add(1, dst, a_size.gather(1, src))
    keep_a_size = a_size.gather(1, unmerged)
    new_size = torch.cat([keep_a_size, b_size], dim=1)
    hidden_a, hidden_b = merge(hidden.float(), weighted=True)
    metric_a, metric_b = merge(metric.float(), weighted=True)
    new_hidden = torch.cat([hidden_a, hidden_b], dim=1) / new_size.unsqueeze(-1)
    new_metric = torch.cat([metric_a, metric_b], dim=1) / new_size.unsqueeze(-1)
    new_protected = torch.cat([protected[:, a_idx].gather(1, unmerged), protected[:, b_idx]], dim=1)
    new_orig = torch.cat([orig_index[:, a_idx].gather(1, unmerged), orig_index[:, b_idx]], dim=1)
    order_back = new_orig.argsort(dim=1)
    take = lambda t: t.gather(1, order_back if t.dim() == 2 else order_back.unsqueeze(-1).expand_as(t))  # noqa: E731
    return (
        take(new_hidden).to(hidden.dtype),
        take(new_metric),
        take(new_size),
        take(new_protected),
        take(new_orig),
    )


@register
class ToMeMethod(TokenMethod):
    name = "tome"
    config_class = ToMeConfig
    needs_keys = True
    merges = True
    description = "merge similar tokens by bipartite soft matching on keys (ToMe), size-weighted"

    def reduce(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        """Merge rounds until ``num_keep`` prunable tokens are left, as a decision over the state's own positions:
        each survivor stays at its B anchor's position and carries the merged hidden state and size."""
        count = num_keep.reshape(-1)
        if count.numel() and not bool((count == count[0]).all()):
            raise ValueError(
                f"tome merges the same number of tokens in every sample, got per-sample counts {count.tolist()} "
                f"at site {state.site}."
            )
        hidden, metric, size, protected = state.hidden, state.keys, state.size, state.protected
        b, n = protected.shape
        # the rounds carry each token's position in the state (its rows are in ascending original order, so the
        # merge keeps the same order it would by original index): the survivors' positions come out directly
        position = torch.arange(n, device=hidden.device).expand(b, n)
        remaining = num_prunable_alive(state) - (int(count[0]) if count.numel() else 0)
        while remaining > 0:
            mergeable = (~protected[:, 0::2]).sum(dim=1).min().item()
            r = min(remaining, int(mergeable), hidden.shape[1] // 2)
            hidden, metric, size, protected, position = bipartite_merge(hidden, metric, size, protected, position, r)
            remaining -= r
        keep = torch.zeros_like(state.protected).scatter_(1, position, True)
        merged = state.hidden.scatter(1, position.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]), hidden)
        return KeepDecision(keep, merged, torch.zeros_like(state.size).scatter_(1, position, size))

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``) beyond the captured keys (charged by the bench for
        ``needs_keys``), per round of :func:`bipartite_merge` on ``n`` tokens merging ``r``: normalising the
        head-averaged keys (width ``h``) ``3 n h``, the similarity of set A to set B ``2 ⌈n/2⌉ ⌊n/2⌋ h``, and the
        size-weighted merge of hidden states and keys (weigh ``n``, add ``r``, divide ``n - r`` rows) ``2 n (d + h)``.
        Rounds as :meth:`reduce` runs them, the protected tokens at the front of the sequence."""
        n, h, d = site.tokens, site.head_dim, site.hidden
        remaining = site.prunable - site.keep
        total = 0.0
        while remaining > 0:
            mergeable = (n + 1) // 2 - (site.protected + 1) // 2  # unprotected tokens at even positions (set A)
            r = min(remaining, mergeable, n // 2)
            if r <= 0:
                break
            total += site.normalize(n, h) + site.matmul((n + 1) // 2, h, n // 2) + 2.0 * n * (d + h)
            n, remaining = n - r, remaining - r
        return total
