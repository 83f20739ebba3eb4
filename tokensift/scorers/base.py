"""The interface every token method implements, learned or training-free.

A method scores tokens (``score``), picks the survivors (``select``: a ``[B, N]`` keep mask, the protected live
tokens plus ``num_keep[b]`` prunable tokens of each sample ``b``) and decides what the site keeps (``reduce``: a
``KeepDecision``, the mask and, for a merge such as ToMe or VisionZip, the merged hidden states and sizes written
into kept tokens). ``num_keep`` is always a ``[B]`` long tensor, one count per sample. In mask mode (training) it
returns a keep ``policy`` instead (``keep_policy``). The method never shrinks a sequence itself:
``tokensift.compact`` applies a decision to each layout (a vision tower's equal counts, a multimodal LLM's padded
rows, a packed tower). The defaults make a new scoring method one ``score`` function.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from tokensift.state import TokenState

Kind = Literal["learned", "training-free"]


@dataclass
class KeepDecision:
    """What a method keeps at a site, over the state's tokens as they are (``[B, N]``, the state's order).

    ``keep``: bool, the protected live tokens and ``num_keep[b]`` prunable tokens of sample ``b``.
    ``hidden``: ``[B, N, D]`` when a merge wrote merged values into kept tokens; ``None``: ``state.hidden`` unchanged.
    ``size``: ``[B, N]`` how many original tokens each kept token stands for (ToMe); ``None``: ``state.size``.
    ``key_bias``: ``[B, N]`` additive attention bias on these tokens as keys in the *next* block, compaction deferred
    until after that block (STTS: ``log(score)``, the path by which the answer loss reaches a scorer whose tokens are
    then removed, in training as at inference); ``None``: compact right away.
    Values at dropped tokens are never read.
    """

    keep: Tensor
    hidden: Tensor | None = None
    size: Tensor | None = None
    key_bias: Tensor | None = None


@dataclass
class MethodConfig:
    """Options common to every method; a method's own config dataclass subclasses this one.

    ``sites``: where the method reduces tokens (``vit.<i>``); ``None`` picks the method's default.
    """

    sites: list[str] | None = None

    @classmethod
    def from_dict(cls, values: dict | None) -> MethodConfig:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{cls.__name__} has no option {unknown}; its options are {sorted(known)}.")
        return cls(**values)


class Method(nn.Module):
    """What every method has, whatever it reduces: a registered name, learned or not, its config, where it runs.

    ``TokenMethod`` (tokens) and ``LayerSkipMethod`` (whole blocks, ``skips_layers``) build on it; the
    registry, artifacts and ``tokensift export`` take any ``Method``.
    """

    name: ClassVar[str]
    kind: ClassVar[Kind] = "training-free"
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    description: ClassVar[str] = ""
    site_kinds: ClassVar[tuple[str, ...]] = ()
    skips_layers: ClassVar[bool] = False  # removes whole blocks (budget ``skip_layers``) instead of tokens
    # a sampled *token* decision, without gradient, trained by policy gradient on a reward (cacovid: GRPOTrainer,
    # ia_red2: ReinforceTrainer); das's layer-skip bandit also learns from a reward but is ``skips_layers`` instead
    trained_by_reward: ClassVar[bool] = False

    def __init__(self, config: MethodConfig | None = None):
        super().__init__()
        self.config = config if config is not None else self.config_class()

    @classmethod
    def for_backbone(cls, adapter, config: MethodConfig | None = None) -> Method:
        """The method sized for ``adapter``'s backbone; a method with backbone-dependent fields overrides it."""
        return cls(config)


SITE_KIND = "layers"  # what ts.methods() lists as a layer-skip method's sites


class LayerSkipMethod(Method):
    """Base of methods that skip whole blocks: which blocks to skip for a count, and what replaces each one.

    Subclasses implement ``candidate_layers`` (the blocks that may be skipped), ``skip_order`` (those blocks,
    the first to skip first) and ``replacement(layer)`` (the module that runs instead of block ``layer``). A method
    trained by the bandit (``tokensift.trainer.LayerSkipTrainer``) also holds ``scores`` (a ``[C]`` buffer, one arm
    per candidate layer, moved by the search) and implements ``probabilities()``. ``tokensift.skip`` applies it.
    """

    skips_layers: ClassVar[bool] = True
    site_kinds: ClassVar[tuple[str, ...]] = (SITE_KIND,)
    # the adapters of the blocks a step does not skip get no gradient: DDP has to look for them
    has_unused_parameters: ClassVar[bool] = True
    scores: Tensor  # ``[C]`` the bandit's score of each candidate layer (a buffer of the subclass)

    @property
    def candidate_layers(self) -> list[int]:
        raise NotImplementedError(f"{type(self).__name__} must implement candidate_layers")

    def skip_order(self) -> list[int]:
        """The candidate layers, the one to skip first first."""
        raise NotImplementedError(f"{type(self).__name__} must implement skip_order()")

    def replacement(self, layer: int) -> nn.Module:
        """The module run in place of block ``layer`` (hidden states in, hidden states out)."""
        raise NotImplementedError(f"{type(self).__name__} must implement replacement(layer)")

    def replacement_flops(self, layer: int, tokens: int) -> float:
        """FLOPs of ``replacement(layer)`` on ``tokens`` hidden states (``tokensift.flops`` charges it in place of the
        block)."""
        raise NotImplementedError(f"{type(self).__name__} must implement replacement_flops(layer, tokens)")

    def probabilities(self) -> Tensor:
        """``[C]`` each candidate layer's probability of being skipped by a search step (the bandit trainer draws
        from it)."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement probabilities() (and hold a `scores` buffer) to be trained by "
            "the bandit (LayerSkipTrainer / MLLMLayerSkipTrainer)."
        )

    def layers_of(self, arms: Tensor) -> list[int]:
        """The layers of bandit arms (indices into ``candidate_layers``)."""
        candidates = self.candidate_layers
        return [candidates[int(arm)] for arm in arms]

    def check_skip_count(self, skip_layers: int, field: str = "skip_layers") -> int:
        """``skip_layers`` as an int in ``[0, len(candidate_layers)]``, or a ValueError naming ``field``."""
        limit = len(self.candidate_layers)
        if isinstance(skip_layers, bool) or not isinstance(skip_layers, int) or not 0 <= skip_layers <= limit:
            raise ValueError(
                f"{field} must be a whole number of layers in [0, {limit}] ({self.name} may skip layers "
                f"{self.candidate_layers}), got {skip_layers!r}."
            )
        return skip_layers

    def skipped(self, skip_layers: int) -> list[int]:
        """The ``skip_layers`` layers skipped first (``skip_order``'s head), in layer order."""
        count = self.check_skip_count(skip_layers)
        return sorted(self.skip_order()[:count])

    def check_backbone(self, adapter) -> None:
        """Raise unless the method was built for a backbone of this shape (a ValueError naming the field)."""


def cache_anchor_layers(text_config) -> set[int]:
    """The decoder layers whose KV cache transformers reads the past length and mask sizes from: layer 0, and the
    first layer of each attention type (``layer_types``: Qwen2's sliding-window layers size the sliding mask from
    the first sliding layer's cache, the causal mask from the first full-attention one)."""
    layer_types = getattr(text_config, "layer_types", None) or []
    anchors = {0}
    for kind in set(layer_types):
        anchors.add(list(layer_types).index(kind))
    return anchors


def is_skip_method(method: object) -> bool:
    """True for a layer-skip method (class or instance): its budget is ``skip_layers``, not a keep ratio."""
    return bool(getattr(method, "skips_layers", False))


class TokenMethod(Method):
    """Base class of every token method. Subclasses set the class attributes and implement ``score``."""

    needs_attention: ClassVar[bool] = False  # attention probabilities of the site's block
    needs_keys: ClassVar[bool] = False  # head-averaged keys of the site's block
    needs_values: ClassVar[bool] = False  # vit.<i>: the site block's values per head (``TokenState.values``)
    # vit.<i>: each token's pixel patch of the forward's pixel_values (``TokenState.patch_pixels``; [CLS] zero)
    needs_pixels: ClassVar[bool] = False
    # vit.<i>: the vision-tower handle calls the method's ``observe(state)`` after every block that is no running
    # site, from the first block while more prunable tokens are alive than the last site keeps (its attention and,
    # on request, values captured there); a method that accumulates evidence over every block (FlowCut) keeps it
    # between the blocks of one forward pass
    observes_every_block: ClassVar[bool] = False
    # llm.<k>: the last text token's attention computed by layer k itself on its input (PyramidDrop)
    needs_query_attention: ClassVar[bool] = False
    needs_final_norm: ClassVar[bool] = False  # llm.<k>: the site's hidden states through the LM's final norm (DART)
    merges: ClassVar[bool] = False  # reduces by merging (no mask-mode equivalent)
    # vit.<i> of a packed tower: each group's patches (``TokenState.group_patches`` / ``group_patch_valid``; STTS)
    needs_group_patches: ClassVar[bool] = False
    # trained in gather mode, as at inference: the decision's ``key_bias`` carries the gradient (STTS; DynamicViT's
    # ``train_by_removal`` makes it a property of its config)
    trains_by_removal: ClassVar[bool] = False
    # trained by removal with its differentiable ``keep_policy`` deciding and entering the next block's policy
    # attention before the compaction (DynamicViT's ``removal_gradient: kept_tokens``)
    removal_policy: ClassVar[bool] = False
    # a training step may leave some parameters without gradient (e.g. one exit router trained per step):
    # DDP then has to search for them (find_unused_parameters), which costs a graph traversal per step
    has_unused_parameters: ClassVar[bool] = False
    num_default_sites: ClassVar[int] = 1
    # where the method can run: "vit" (vision blocks), "pre_llm" and "llm" (a multimodal LLM's decoder)
    site_kinds: ClassVar[tuple[str, ...]] = ("vit",)
    needs_tower_attention: ClassVar[bool] = False  # pre_llm: the vision tower's attention and keys per token
    # exit methods (DyVTE): the method itself decides, per sample, whether all its visual tokens leave at a
    # site, so the handle runs it at every one of its sites in every prefill, whatever the budget; its
    # budget is a decision threshold (ts.apply(..., threshold=)) rather than a keep ratio or count
    decides_exits: ClassVar[bool] = False

    @property
    def keeps_budget_count(self) -> bool:
        """True when training keeps exactly the budget's count at every site, as inference does.

        The budget term of the objective (kept fraction vs target) is then constant: the trainer leaves it out.
        """
        return True

    def auxiliary_losses(self) -> dict[str, Tensor]:
        """The method's own training terms of the last forward pass, already weighted (STTS's ``temporal``), then
        forgotten; the trainer adds them to the loss. None by default."""
        return {}

    def set_progress(self, fraction: float) -> None:
        """The share of training done, in ``[0, 1]``, told by the trainer each step: methods with annealed
        temperatures (``dynamic_llava``, ``question_selector``) follow it; nothing by default."""

    def default_sites(self, adapter) -> list[str]:
        if getattr(adapter, "is_multimodal", False):
            return self.default_mllm_sites(adapter)
        return adapter.spread_sites(self.num_default_sites)

    def default_mllm_sites(self, adapter) -> list[str]:
        """Sites on a multimodal LLM: before the LLM when the method can run there, else spread over its layers."""
        if "pre_llm" in self.site_kinds:
            return ["pre_llm"]
        return adapter.spread_llm_sites(self.num_default_sites)

    def score(self, state: TokenState) -> Tensor:
        """``[B, N]`` keep scores, higher = keep. Protected and dropped tokens are handled by ``select``."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(), or override select() or reduce().")

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """``[B, N]`` bool: each sample's protected live tokens and its ``num_keep[b]`` best prunable tokens.

        ``num_keep`` is a ``[B]`` long tensor: samples of a multimodal batch keep different counts.
        """
        scores = self.score(state).float()
        check_scores(scores, state.prunable, self.name, state.site)
        return top_k_mask(scores, state, num_keep)

    def reduce(self, state: TokenState, num_keep: Tensor) -> KeepDecision:
        """What the site keeps; merging methods (ToMe, VisionZip) override it to carry merged values."""
        return KeepDecision(self.select(state, num_keep))

    def keep_policy(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """Mask-mode decision ``[B, N]``: 1 for survivors, 0 otherwise (learned methods: differentiable)."""
        if self.merges:
            raise ValueError(f"{self.name} merges tokens, which has no mask-mode form; run it in gather mode.")
        decision = self.reduce(state, num_keep)
        if decision.hidden is not None:
            raise ValueError(f"{self.name} writes merged tokens, which have no mask-mode form; run it in gather mode.")
        policy = decision.keep.to(state.hidden.dtype)
        return policy if state.policy is None else policy * state.policy


def check_scores(scores: Tensor, candidates: Tensor, method: str, site: str) -> None:
    """Raise unless every candidate token's score is a number: NaN has no rank, so a top-k would keep arbitrary
    tokens silently. (``-inf`` / ``inf`` rank fine: never / always keep.)"""
    bad = torch.isnan(scores) & candidates
    if bool(bad.any()):
        rows = bad.any(1).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"{method} scores at site {site} are NaN for {int(bad.sum())} token(s) of sample(s) {rows[:8]}: they "
            "cannot be ranked, so no tokens were selected. Check the inputs (NaN / inf pixels or embeddings) and, "
            "for a learned method, its weights (a scorer trained into NaN)."
        )


def check_site_input(hidden: Tensor, rows: Tensor, method: str, site: str) -> None:
    """Raise when the hidden states a method is about to score at ``site`` hold NaN / inf (``rows``: ``[B, N]``
    the tokens that count: live, or valid in a padded multimodal batch). Every method, however it selects,
    would rank such tokens arbitrarily."""
    bad = ~torch.isfinite(hidden).all(-1) & rows
    if bool(bad.any()):
        samples = bad.any(1).nonzero().flatten().tolist()
        raise FloatingPointError(
            f"the hidden states reaching {method} at site {site} are NaN / inf for sample(s) {samples[:8]}: "
            "tokens cannot be scored. Check the model's inputs (NaN / inf pixel_values) and weights."
        )


def top_k_mask(scores: Tensor, state: TokenState, num_keep: Tensor) -> Tensor:
    """``[B, N]`` bool: each sample's ``num_keep[b]`` best prunable tokens by score, plus its protected ones."""
    candidates = state.prunable
    order = scores.masked_fill(~candidates, float("-inf")).argsort(dim=1, descending=True, stable=True)
    # candidates first, so one scored -inf still outranks every non-candidate and each sample keeps its count
    order = order.gather(1, (~candidates).gather(1, order).to(torch.uint8).argsort(dim=1, stable=True))
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
    keep = candidates & (rank < num_keep.to(rank.device).unsqueeze(1))
    return keep | (state.protected & state.alive)


def num_prunable_alive(state: TokenState) -> int:
    """Prunable tokens still in play (the same for every sample of a batch at inference)."""
    return int(state.prunable.sum(1).max())
