"""FlowCut: prune the vision tower step by step, by the information flowing through its [CLS] token.

FlowCut (Tong et al., NeurIPS 2025, arXiv 2505.19536; code: TungChintao/FlowCut, ``flowcut/utils_flowcut.py``
``compute_score`` and ``flowcut/modeling_clip_flowcut.py`` ``CLIPAttention_forward`` / ``CLIPEncoderLayer_forward``)
finds that [CLS] relays the tower's information flow and that redundancy emerges layer by layer, so one layer's
attention is not enough to rank tokens. After every block it scores each live patch ``j`` by three criteria read
off that block's attention and values,

    score_j = (a_j / Σ a + s_j / Σ s) · ‖v̄_j‖₁        (sums over the live patches)

- ``a``: the [CLS] row of the block's attention, averaged over heads (how much flow [CLS] draws from ``j``);
- ``s``: per head, the softmax over the live tokens ([CLS] included) of ``v_cls · v_j`` (unscaled), averaged over
  heads: the patch's semantic agreement with [CLS];
- ``‖v̄_j‖₁``: the L1 norm of the patch's value averaged over heads, its information density;

and accumulates it over the blocks of one forward pass, ``flow = decay · flow_before + (1 − decay) · score``
(FlowCut: 0.5), from the first block for as long as more patches are alive than the last site keeps; each site
keeps the patches with the most accumulated flow. The blocks between sites reach the method through ``observe``
(``observes_every_block``): the handle captures their attention and values as it does a site's.

Where tokensift differs (``docs/methods.md``): the budget sets each site's count (FlowCut: an entropy-adaptive
count, the maximum over the batch, so an image's pruning depended on its batch). Without [CLS] (SigLIP) the
attention received, averaged over live queries, and each head's mean live value stand in for [CLS]'s row and
value. With grouped-query attention the similarity is taken per key/value head.

The accumulated flow lives on the method between the blocks of one forward pass and is checked, at every block,
to belong to it: the same rows (``sample_index``, the handle's per-forward tensor, and ``draw``), a deeper block,
and every live token kept at the block it comes from. A new forward's first block is block 0 (no deeper block
came before it), or, when no block is observed, its first site sees every token alive, which no earlier site
kept (a site that runs drops at least one token), so its flow starts afresh.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.scorers.vision_sites import every_other_vit_site, spread_vit_sites
from tokensift.state import TokenState


@dataclass
class FlowCutConfig(MethodConfig):
    """FlowCut's options.

    - ``decay``: weight of the flow accumulated at the earlier blocks of the same forward pass, in ``[0, 1)``:
      ``flow = decay · flow_before + (1 − decay) · score`` (FlowCut: 0.5); 0 ranks each site by its own score.
    - ``num_stages``: how many sites the default spreads the pruning over (equal depth fractions); ``None``: every
      second block ending at the deepest site, FlowCut's pruning layers (blocks 1, 3, …, 21 of LLaVA-1.5's
      24-block CLIP tower; 0, 2, …, 10 of a 12-block ViT). ``sites=`` replaces the default.
    """

    decay: float = 0.5
    num_stages: int | None = None

    def __post_init__(self) -> None:
        decay = self.decay
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(
                f"FlowCutConfig.decay must be a number in [0, 1) (the earlier sites' weight; FlowCut: 0.5), "
                f"got {decay!r}."
            )
        stages = self.num_stages
        if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
            raise ValueError(
                f"FlowCutConfig.num_stages must be a positive integer or None (every second block), got {stages!r}."
            )


@dataclass
class _Flow:
    """The flow accumulated up to one block of one forward pass, indexed by original token index."""

    sample_index: Tensor | None  # the forward's [B] row index tensor (identity marks the forward pass)
    draw: tuple[int, ...]
    layer: int
    kept: Tensor  # [B, N0] bool: the tokens that survived that block
    flow: Tensor  # [B, N0] float: their accumulated flow


@dataclass
class _Pending:
    """``score``'s flow for a state, committed by ``select`` once the survivors are known."""

    state: weakref.ref  # the TokenState scored (a weak reference: it holds the site's attention map)
    flow: Tensor  # [B, N]


def flow_score(relation: Tensor, semantic: Tensor, density: Tensor, candidates: Tensor) -> Tensor:
    """FlowCut's score of one block (``compute_score``): ``(relation / Σ relation + semantic / Σ semantic) · density``.

    ``relation``, ``semantic``, ``density``, ``candidates`` are ``[B, N]``; the sums run over the ``candidates``
    (the live patches) of each row, and every other token scores 0.
    """
    relation = relation.float().masked_fill(~candidates, 0.0)
    semantic = semantic.float().masked_fill(~candidates, 0.0)
    tiny = torch.finfo(torch.float32).tiny
    relation = relation / relation.sum(dim=1, keepdim=True).clamp_min(tiny)
    semantic = semantic / semantic.sum(dim=1, keepdim=True).clamp_min(tiny)
    return ((relation + semantic) * density.float()).masked_fill(~candidates, 0.0)


@register
class FlowCutMethod(TokenMethod):
    name = "flowcut"
    config_class = FlowCutConfig
    needs_attention = True
    needs_values = True
    observes_every_block = True
    num_default_sites = 2  # at least; the default is every second block (FlowCutConfig.num_stages)
    description = (
        "progressive pruning in the vision tower by [CLS] information flow: [CLS] attention + [CLS]-value "
        "similarity, times value L1 norm, accumulated over every block (FlowCut)"
    )

    def __init__(self, config: FlowCutConfig | None = None):
        super().__init__(config)
        self._carry: _Flow | None = None
        self._pending: _Pending | None = None

    def default_sites(self, adapter) -> list[str]:
        if self.config.num_stages is not None:
            return spread_vit_sites(adapter, self.config.num_stages)
        return every_other_vit_site(adapter)

    def default_mllm_sites(self, adapter) -> list[str]:
        return self.default_sites(adapter)

    # -- scoring --------------------------------------------------------------------------------
    def site_score(self, state: TokenState) -> Tensor:
        """``[B, N]`` FlowCut's score of this block alone (before accumulation); 0 for [CLS] and dropped tokens."""
        attention = require(state, "attention", self.name)  # [B, H, N, N]
        values = require(state, "values", self.name).float()  # [B, Hv, N, Dh]
        alive, candidates = state.alive, state.prunable
        relay = state.protected & alive & (state.orig_index == 0)
        if state.num_prefix > 0 and bool(relay.any(dim=1).all()):
            cls = relay.float().argmax(dim=1)
            rows = torch.arange(attention.shape[0], device=attention.device)
            relation = attention[rows, :, cls, :].float().mean(dim=1)  # [B, N]: [CLS]'s row, head-averaged
            relay_value = values[rows, :, cls]  # [B, Hv, Dh]: [CLS]'s value in every head
        else:  # no [CLS] (SigLIP): attention received over live queries, and each head's mean live value
            queries = alive.float().unsqueeze(-1)
            count = queries.sum(dim=1).clamp_min(1.0)
            relation = (attention.float().mean(dim=1) * queries).sum(dim=1) / count
            relay_value = (values * queries.unsqueeze(1)).sum(dim=2) / count.unsqueeze(1)
        # per head v_cls · v_j (unscaled), softmax over the live tokens, [CLS] included; then averaged over heads
        similarity = (values @ relay_value.unsqueeze(-1)).squeeze(-1)  # [B, Hv, N]
        similarity = similarity.masked_fill(~alive.unsqueeze(1), float("-inf"))
        semantic = similarity.softmax(dim=-1).nan_to_num(0.0).mean(dim=1)
        density = values.mean(dim=1).abs().sum(dim=-1)  # ‖v̄_j‖₁, v̄ the value averaged over heads
        return flow_score(relation, semantic, density, candidates)

    def _accumulate(self, state: TokenState) -> Tensor:
        flow = self.site_score(state)
        before = self._flow_before(state)
        if before is not None:
            decay = float(self.config.decay)
            flow = decay * before + (1.0 - decay) * flow
        return flow

    def observe(self, state: TokenState) -> None:
        """A block that prunes nothing (the handle calls it after every block that is no running site, while tokens
        remain to be removed): its score joins the flow of the live tokens."""
        self._remember(state, self._accumulate(state), state.alive)

    def score(self, state: TokenState) -> Tensor:
        """``[B, N]`` the flow accumulated up to this site of the current forward pass (``site_score`` at its first)."""
        flow = self._accumulate(state)
        self._pending = _Pending(weakref.ref(state), flow)
        return flow

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """The base top-k of the accumulated flow; the survivors' flow is then carried to the next block."""
        keep = super().select(state, num_keep)
        pending, self._pending = self._pending, None
        if pending is not None and pending.state() is state:
            self._remember(state, pending.flow, keep)
        return keep

    # -- the flow carried between the sites of one forward pass --------------------------------
    def _flow_before(self, state: TokenState) -> Tensor | None:
        """The flow the tokens of ``state`` accumulated at the earlier blocks of the same forward pass, or None."""
        carry = self._carry
        if carry is None or carry.layer >= state.layer or carry.draw != tuple(state.draw):
            return None
        if carry.sample_index is not state.sample_index:
            return None
        rows, full = state.hidden.shape[0], _full_length(state)
        if carry.kept.shape != (rows, full) or carry.kept.device != state.orig_index.device:
            return None
        index = state.orig_index.long()
        if not bool((carry.kept.gather(1, index) | ~state.alive).all()):
            return None  # a live token was not kept there: another forward pass's flow
        return carry.flow.gather(1, index)

    def _remember(self, state: TokenState, flow: Tensor, keep: Tensor) -> None:
        rows, full = state.hidden.shape[0], _full_length(state)
        index = state.orig_index.long()
        kept = torch.zeros(rows, full, dtype=torch.bool, device=index.device)
        kept.scatter_(1, index, keep & state.alive)
        carried = torch.zeros(rows, full, dtype=torch.float32, device=index.device)
        carried.scatter_(1, index, flow.detach().float())
        self._carry = _Flow(state.sample_index, tuple(state.draw), state.layer, kept, carried)

    def analytic_flops(self, site) -> float:
        """FLOPs at a site or observed block (a ``tokensift.flops.SiteShape``) beyond the captured map and values
        (charged by ``capture_flops``). With [CLS]: its row averaged over heads ``H n``, every value's dot product with
        [CLS]'s in its head ``2 n H h``, the values averaged over heads ``n H h`` and their L1 norms ``2 n h``.
        Without [CLS]: the map averaged over heads ``H n²``, the attention received as a weighted sum over queries
        ``2 n²`` and each head's mean value ``2 n H h`` instead of the row. Softmaxes, normalisations and the
        accumulation are O(H n)."""
        n, h, heads = site.tokens, site.head_dim, site.kv_heads
        common = 2 * n * heads * h + n * heads * h + 2 * n * h
        if site.protected > 0:
            return float(site.heads * n + common)
        return float(site.heads * n * n + 2 * n * n + 2 * n * heads * h + common)


def _full_length(state: TokenState) -> int:
    """Tokens of the unpruned sequence: the special tokens and the patch grid."""
    return state.num_prefix + state.grid[0] * state.grid[1]
