"""IA-RED²'s multi-head interpreters (Pan et al., NeurIPS 2021), one per stage of a frozen ViT, trained by REINFORCE.

No official code exists (the project page says "coming soon"); the interpreter follows a third-party
re-implementation (``PerBlockAgent``, ``docs/methods.md``): the tokens are layer-normed (no affine), one query from
the [CLS] token and one key per token are projected into ``H`` heads of width ``w``, and head ``h`` gives token
``j`` the keep probability ``sigmoid(q_h · k_hj / sqrt(w) + a_h · logit(c) + b_h)``; the keep probability is the
mean of the ``H`` heads' maps, which are the interpretation (``head_maps()``, recorded on request inside
``recording_head_maps()``). The query is the mean of the protected live tokens ([CLS], and any register tokens the
tower has, averaged with it), or of every live token in a tower without them (SigLIP). ``c`` is the share of the live
patches the site keeps under the budget (``keep_target · patches / live patches``); ``a_h`` starts at 1 and ``b_h``
at 0, so an untrained interpreter keeps about the budget's share in expectation and one artifact serves a range of
budgets (the conditioning is tokensift's: IA-RED² trains one interpreter per budget).

- Inference (``select``): the top ``num_keep[b]`` live patches by keep probability; the handle compacts, so a
  patch dropped at one stage is never seen again.
- Training (``keep_policy`` in mask mode): each live patch is kept with its probability, a Bernoulli draw from
  ``state.uniform(0, "ia_red2.bernoulli")`` (a function of the sample, the trainer's draw and the token), hard 0/1
  without gradient, multiplied into ``state.policy`` (dropped stays dropped). Each site adds its draw (the keep
  logits with their graph, what it kept, over which live patches) to the forward's list, which the trainer takes
  (``take_draws``) and turns into the ``[B]`` log-probability of the REINFORCE loss
  (``tokensift.trainer.rl.combination_log_prob`` summed per row, ``tokensift.trainer.reinforce_module``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensift.scorers.base import MethodConfig, TokenMethod, check_scores
from tokensift.scorers.learned import check_bool, check_int
from tokensift.scorers.registry import register
from tokensift.state import SampleCounter, TokenState, with_sample_index

BERNOULLI_STREAM = "ia_red2.bernoulli"
_PROBABILITY_FLOOR = 1e-4  # keeps logit(c) finite when a site keeps every live patch, or none


@dataclass
class IARed2Config(MethodConfig):
    """``hidden_size`` and ``sites`` are filled from the backbone by ``IARed2Method.for_backbone``."""

    hidden_size: int | None = field(
        default=None, metadata={"help": "Width of the vision tower's hidden states; filled from the backbone."}
    )
    num_stages: int = field(
        default=3, metadata={"help": "Stages (interpreters) spread over the tower when sites is null (DynamicViT's)."}
    )
    num_heads: int = field(
        default=4, metadata={"help": "Heads of each multi-head interpreter; the keep probability is their mean."}
    )
    width: int = field(default=16, metadata={"help": "Width of each interpreter head's query and keys."})
    budget_conditioned: bool = field(
        default=True,
        metadata={
            "help": "Each head's logit is shifted by a_h · logit(share of live patches the site keeps) + b_h, so one "
            "interpreter serves any budget; false: b_h only."
        },
    )

    def __post_init__(self) -> None:
        check_int(self, "hidden_size", optional=True)
        check_int(self, "num_stages")
        check_int(self, "num_heads")
        check_int(self, "width")
        check_bool(self, "budget_conditioned")


@dataclass
class BernoulliDraw:
    """One site's training draw: ``logits`` ``[B, N]`` the logit of each patch's keep probability (with gradient;
    ``sigmoid(logits)`` is the mean of the heads' probabilities the draw used), ``kept`` ``[B, N]`` bool the draw,
    ``candidates`` ``[B, N]`` bool the live patches it was drawn over."""

    site: str
    logits: Tensor
    kept: Tensor
    candidates: Tensor


class _Interpreter(nn.Module):
    """One stage's multi-head interpreter: ``[B, H, N]`` per-head keep logits from the [CLS] query."""

    def __init__(self, dim: int, heads: int, width: int, conditioned: bool):
        super().__init__()
        self.heads, self.width = heads, width
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.query = nn.Linear(dim, heads * width)
        self.key = nn.Linear(dim, heads * width)
        self.budget_scale = nn.Parameter(torch.ones(heads)) if conditioned else None
        self.bias = nn.Parameter(torch.zeros(heads))

    def forward(self, hidden: Tensor, query_weight: Tensor, keep_share: Tensor) -> Tensor:
        b, n, _ = hidden.shape
        x = self.norm(hidden.to(self.query.weight.dtype))  # a float32 interpreter reads a bf16 / fp16 tower too
        w = query_weight.to(x.dtype).unsqueeze(-1)
        # [B, D]: the mean of the weighted tokens: [CLS] (with any registers), or the live tokens without one
        source = (x * w).sum(1) / w.sum(1).clamp_min(1e-6)
        q = self.query(source).view(b, self.heads, 1, self.width)
        k = self.key(x).view(b, n, self.heads, self.width).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)).squeeze(2) / math.sqrt(self.width)  # [B, H, N]
        shift = self.bias.view(1, -1, 1)
        if self.budget_scale is not None:
            share = keep_share.clamp(_PROBABILITY_FLOOR, 1 - _PROBABILITY_FLOOR).to(logits.dtype)
            shift = shift + self.budget_scale.view(1, -1, 1) * torch.logit(share).view(-1, 1, 1)
        return logits + shift


@register
class IARed2Method(TokenMethod):
    name = "ia_red2"
    kind = "learned"
    config_class = IARed2Config
    num_default_sites = 3
    site_kinds = ("vit",)
    trained_by_reward = True  # Bernoulli draws without gradient: ReinforceTrainer, not ScorerTrainer
    description = "IA-RED² multi-head interpreters: per-head [CLS]-query keep maps, trained by REINFORCE (learned)"

    def __init__(self, config: IARed2Config | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None or cfg.sites is None:
            raise ValueError("IARed2Config needs hidden_size and sites; build it with IARed2Method.for_backbone().")
        self.interpreters = nn.ModuleList(
            _Interpreter(cfg.hidden_size, cfg.num_heads, cfg.width, cfg.budget_conditioned) for _ in cfg.sites
        )
        self._samples = SampleCounter()  # Bernoulli draws for states without a sample index: rows in arrival order
        self._draws: list[BernoulliDraw] = []
        # site -> [B, H, P]: each head's keep probability over the original patch grid (0 for patches already
        # dropped before the site), recorded only inside recording_head_maps(): training and timed passes skip the
        # scatter and the [B, H, P] copy
        self._head_maps: dict[str, Tensor] = {}
        self._recording_head_maps = False

    @classmethod
    def for_backbone(cls, adapter, config: IARed2Config | None = None) -> IARed2Method:
        config = replace(config) if config is not None else IARed2Config()  # the caller's config stays as given
        if config.hidden_size is None:
            config.hidden_size = adapter.hidden_size
        if config.sites is None:
            config.sites = adapter.spread_sites(config.num_stages)
        return cls(config)

    @property
    def keeps_budget_count(self) -> bool:
        """Training draws each patch independently, so the kept count varies; inference keeps the budget's top-k."""
        return False

    # -- the interpreter -------------------------------------------------------------------------
    def head_logits(self, state: TokenState) -> Tensor:
        """``[B, H, N]`` each head's keep logit of every token of ``state`` (meaningful at live patches)."""
        if state.site not in self.config.sites:
            raise ValueError(
                f"ia_red2 has interpreters at {self.config.sites}, not at {state.site!r}: apply it with the sites it "
                "was built for (the artifact's), or build it with IARed2Config(sites=[...]) for these."
            )
        if state.keep_target is None:
            raise ValueError(
                f"ia_red2 at {state.site} needs the site's keep target (TokenState.keep_target): run it through a "
                "PruningHandle / ts.apply with a keep_ratio or keep_count budget, which sets it."
            )
        candidates = state.prunable
        live = candidates.sum(1).clamp_min(1).float()
        patches = float(state.grid[0] * state.grid[1])
        keep_share = state.keep_target.float().to(live.device) * patches / live
        # the reference's query is [CLS]; the state marks every prefix token protected without telling [CLS] from
        # registers, so a tower with registers averages them into the query (they summarise the image too)
        cls_present = (state.protected & state.alive).any(1, keepdim=True)
        query_weight = torch.where(cls_present, state.protected & state.alive, state.alive)
        stage = self.config.sites.index(state.site)
        logits = self.interpreters[stage](state.hidden, query_weight, keep_share).float()
        if self._recording_head_maps:
            self._record_maps(state, torch.sigmoid(logits.detach()))
        return logits

    def head_probabilities(self, state: TokenState) -> Tensor:
        """``[B, H, N]`` each head's keep probability of every token of ``state`` (meaningful at live patches)."""
        return torch.sigmoid(self.head_logits(state))

    def score(self, state: TokenState) -> Tensor:
        """``[B, N]`` keep probability: the mean of the heads' maps."""
        return self.head_probabilities(state).mean(1)

    @contextmanager
    def recording_head_maps(self) -> Iterator[None]:
        """Record each site's per-head keep maps of the forward pass run inside (``head_maps()`` then returns them).

        Entering forgets the maps of any earlier pass, so a site that did not run (nothing to drop) has no entry
        rather than an old one; a further pass inside the same context replaces the maps from its first site on
        (sites run in order). Outside the context nothing is recorded."""
        self._head_maps, self._recording_head_maps = {}, True
        try:
            yield
        finally:
            self._recording_head_maps = False

    def _record_maps(self, state: TokenState, probs: Tensor) -> None:
        b, heads = probs.shape[:2]
        patches = state.grid[0] * state.grid[1]
        sites = self.config.sites
        if any(sites.index(site) >= sites.index(state.site) for site in self._head_maps):
            self._head_maps = {}  # a new forward pass inside the same recording
        # prefix tokens ([CLS], registers) go to a spare last column, so only patches land on the patch grid
        patch = state.orig_index - state.num_prefix
        column = torch.where(patch >= 0, patch, torch.full_like(patch, patches))
        full = probs.new_zeros(b, heads, patches + 1)
        full.scatter_(2, column.unsqueeze(1).expand(-1, heads, -1), probs * state.prunable.unsqueeze(1))
        self._head_maps[state.site] = full[..., :patches]

    def head_maps(self) -> dict[str, Tensor]:
        """Each site's ``[B, H, P]`` per-head keep maps (``P`` the original patch grid) of the pass last run inside
        ``recording_head_maps()``; empty when none was."""
        return dict(self._head_maps)

    # -- training ---------------------------------------------------------------------------------
    def keep_policy(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """Eval: the top-k policy. Training: a Bernoulli draw per live patch (no gradient through it) times
        ``state.policy``; the draw is kept for the trainer (``take_draws``)."""
        if not self.training:
            return super().keep_policy(state, num_keep)
        if state.site == self.config.sites[0]:
            self._draws = []  # a new forward pass
        head_logits = self.head_logits(state)
        probs = torch.sigmoid(head_logits).mean(1)
        # logit of the heads' mean probability, log p − log(1 − p), each a logsumexp: exact where p saturates
        logits = torch.logsumexp(F.logsigmoid(head_logits), 1) - torch.logsumexp(F.logsigmoid(-head_logits), 1)
        candidates = state.prunable
        check_scores(probs, candidates, self.name, state.site)
        u = with_sample_index(state, self._samples).uniform(0, stream=BERNOULLI_STREAM)
        kept = (u.to(probs.device) < probs.detach()) & candidates
        self._draws.append(BernoulliDraw(state.site, logits, kept, candidates))
        policy = (kept | (state.protected & state.alive)).to(state.hidden.dtype)
        return policy if state.policy is None else policy * state.policy

    def take_draws(self) -> list[BernoulliDraw]:
        """The last training forward's draws, one per site in order; then forgotten."""
        if not self._draws:
            raise ValueError(
                "ia_red2 drew no keep decisions since the last take_draws(): run a forward pass with the method in "
                "training mode and the handle in mask mode first."
            )
        draws, self._draws = self._draws, []
        return draws

    # -- cost -------------------------------------------------------------------------------------
    def analytic_flops(self, site) -> float:
        """One image at a site of ``n`` tokens, width ``d``, ``H`` heads of width ``w``: the layer norm ``5 n d``,
        the keys ``2 n d Hw`` and the [CLS] query ``2 d Hw``, the logits ``2 n Hw``, the budget shift, sigmoid and
        head mean ``7 n H``."""
        cfg = self.config
        n, d, inner = site.tokens, site.hidden, cfg.num_heads * cfg.width
        projections = site.matmul(n, d, inner) + site.matmul(1, d, inner)
        return float(5.0 * n * d + projections + 2.0 * n * inner + 7.0 * n * cfg.num_heads)


__all__ = ["BERNOULLI_STREAM", "BernoulliDraw", "IARed2Config", "IARed2Method"]
