"""DyVTE: a light router per LLM layer decides, per sample, when all visual tokens exit.

DyVTE (Dynamic Visual-Token Exit) observes that a multimodal LLM stops reading its visual tokens after
some layer, which differs from sample to sample. A router at layer ``k`` reads the text summary at that
layer, ``[mean text hidden state ⊕ last text-token state]`` (detached), through
``Linear(2d → h) – GELU – Linear(→ 2)`` and predicts "the rest of the model answers the same without the
visual tokens". A sample exits at the first layer whose exit probability reaches the decision threshold:
its visual tokens are gone from that layer on (KV cache included), the other samples of the batch keep
theirs.

The budget is that threshold, chosen at inference (``ts.apply(model, artifact, threshold=0.5)``): 0 exits
every sample at the first router layer, 1 never exits; a lower threshold exits earlier and saves more.
The comparison is made on logits (``exit logit ≥ log(t / (1 - t))``), so both ends are exact.

Options beyond the paper: ``shared_router`` (one router for every layer, which also reads a learned
embedding of the layer), ``output="logit"`` (one exit logit and a sigmoid instead of two classes and a
softmax) and ``normalize_inputs`` (a parameter-free layer norm of each half of the input: LLM hidden states
carry outlier dimensions orders of magnitude larger than the rest, which a plain linear layer trains
poorly on).

Training (``tokensift.trainer.ExitRouterTrainer``) labels a layer ``k`` per sample by running the batch
with and without its visual tokens from ``k`` on; ``forced_exit_layer`` is that second pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import TokenState

ROUTER_OUTPUTS = ("two_way", "logit")
_LLM_SITE_PREFIX = "llm."


@dataclass
class DyVTEConfig(MethodConfig):
    """Routers at ``sites`` (``llm.<k>``; default every LLM layer but the first).

    ``hidden_size`` (d), ``num_layers`` and ``sites`` are filled from the backbone by
    ``DyVTEMethod.for_backbone``. ``router_width`` is h (DyVTE: 2048).
    """

    hidden_size: int | None = None
    num_layers: int | None = None
    router_width: int = 2048
    output: str = "two_way"  # "two_way": Linear(→2) + softmax (DyVTE); "logit": Linear(→1) + sigmoid
    shared_router: bool = False  # one router for every layer, reading a learned layer embedding as well
    layer_embedding_size: int = 32  # width of that embedding (shared_router only)
    normalize_inputs: bool = True  # parameter-free layer norm of the mean and the last text state

    def __post_init__(self) -> None:
        for name in ("router_width", "layer_embedding_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("hidden_size", "num_layers"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.output not in ROUTER_OUTPUTS:
            raise ValueError(f"DyVTEConfig.output must be one of {list(ROUTER_OUTPUTS)}, got {self.output!r}.")
        for name in ("shared_router", "normalize_inputs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DyVTEConfig.{name} must be true or false, got {getattr(self, name)!r}.")
        if self.sites is not None:
            if not self.sites:
                raise ValueError("DyVTEConfig.sites is empty; give at least one llm.<k> site, or null for all.")
            layers = [_site_layer(site) for site in self.sites]
            if layers != sorted(set(layers)):
                raise ValueError(f"DyVTEConfig.sites must be distinct and in layer order, got {self.sites}.")
            if self.num_layers is not None and not all(1 <= k < self.num_layers for k in layers):
                raise ValueError(
                    f"DyVTEConfig.sites {self.sites} must lie in llm.1 .. llm.{self.num_layers - 1} "
                    f"(the model has {self.num_layers} decoder layers)."
                )

    @property
    def layers(self) -> list[int]:
        """The decoder layer of each router site, in order."""
        return [_site_layer(site) for site in self.sites or []]


class ExitRouter(nn.Module):
    """``Linear(in → h) – GELU – Linear(h → 2 | 1)``: exit logits from a sample's text summary."""

    def __init__(self, in_features: int, width: int, outputs: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, outputs))

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


@register
class DyVTEMethod(TokenMethod):
    name = "dyvte"
    kind = "learned"
    config_class = DyVTEConfig
    site_kinds = ("llm",)
    decides_exits = True
    description = "per-layer exit routers on the text summary: a sample's visual tokens all leave at one layer (DyVTE)"

    def __init__(self, config: DyVTEConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None or cfg.num_layers is None or cfg.sites is None:
            raise ValueError(
                "DyVTEConfig needs hidden_size, num_layers and sites: build it with DyVTEMethod.for_backbone(adapter), "
                "or load a trained one (ts.load / ts.apply with an artifact directory)."
            )
        outputs = 2 if cfg.output == "two_way" else 1
        features = 2 * cfg.hidden_size
        if cfg.shared_router:
            self.layer_embedding = nn.Embedding(cfg.num_layers, cfg.layer_embedding_size)
            self.routers = nn.ModuleList([ExitRouter(features + cfg.layer_embedding_size, cfg.router_width, outputs)])
        else:
            self.layer_embedding = None
            self.routers = nn.ModuleList(ExitRouter(features, cfg.router_width, outputs) for _ in cfg.sites)
        self._threshold: float | None = None
        # training: every sample's visual tokens leave at this layer, whatever the routers say
        self.forced_exit_layer: int | None = None
        # the text summary (mean, last) each sample had at the forced exit layer, from the last prefill
        self.forced_summary: tuple[Tensor, Tensor] | None = None

    @classmethod
    def for_backbone(cls, adapter, config: DyVTEConfig | None = None) -> DyVTEMethod:
        config = replace(config) if config is not None else DyVTEConfig()  # the caller's config stays as given
        if config.hidden_size is None:
            config.hidden_size = adapter.hidden_size
        if config.num_layers is None:
            config.num_layers = adapter.num_layers
        if config.sites is None:
            config.sites = [f"llm.{k}" for k in range(1, adapter.num_layers)]
        config.__post_init__()  # the sites against the model's depth
        return cls(config)

    @property
    def has_unused_parameters(self) -> bool:
        """Separate routers: one is trained per step and the others get no gradient (DDP must look for them)."""
        return not self.config.shared_router

    # -- the budget: a decision threshold ---------------------------------------------------------
    @property
    def threshold(self) -> float | None:
        """Exit when the router's exit probability is at least this (0: always, 1: never)."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self._threshold = None if value is None else check_threshold(value)

    # -- routers ------------------------------------------------------------------------------------
    def router_input(self, text_mean: Tensor, text_last: Tensor, layer: int) -> Tensor:
        """``[B, 2d (+ e)]``: the detached text summary at ``layer`` (and the layer's embedding when shared)."""
        dtype = self.routers[0].net[0].weight.dtype
        parts = [text_mean.detach().to(dtype), text_last.detach().to(dtype)]
        if self.config.normalize_inputs:
            parts = [F.layer_norm(part, part.shape[-1:]) for part in parts]
        if self.layer_embedding is not None:
            index = torch.full(text_mean.shape[:1], layer, dtype=torch.long, device=text_mean.device)
            parts.append(self.layer_embedding(index))
        return torch.cat(parts, dim=-1)

    def router_logits(self, text_mean: Tensor, text_last: Tensor, layer: int) -> Tensor:
        """Raw router outputs at ``layer``: ``[B, 2]`` (stay, exit) for ``two_way``, ``[B, 1]`` for ``logit``."""
        router = self.routers[0] if self.layer_embedding is not None else self.routers[self._router_index(layer)]
        return router(self.router_input(text_mean, text_last, layer))

    def exit_logit(self, text_mean: Tensor, text_last: Tensor, layer: int) -> Tensor:
        """``[B]`` log-odds that the sample's visual tokens can leave at ``layer``."""
        logits = self.router_logits(text_mean, text_last, layer)
        return logits[:, 1] - logits[:, 0] if self.config.output == "two_way" else logits[:, 0]

    def score(self, state: TokenState) -> Tensor:
        """``[B]`` exit logit per sample (an exit hypernetwork scores samples, not tokens)."""
        text_mean = require(state, "text_mean", self.name)
        text_last = require(state, "text_last", self.name)
        return self.exit_logit(text_mean, text_last, state.layer)

    def _router_index(self, layer: int) -> int:
        try:
            return self.config.layers.index(layer)
        except ValueError:
            raise ValueError(
                f"dyvte has routers at {self.config.sites}, not at llm.{layer}; run it at the sites it was trained for."
            ) from None

    # -- the keep decision --------------------------------------------------------------------------
    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        """Every token of a sample that keeps its visual tokens; only the text of one that exits here."""
        if self.forced_exit_layer is not None:
            here = state.layer == self.forced_exit_layer
            exiting = torch.full(state.hidden.shape[:1], here, device=state.hidden.device)
            if here:
                self.forced_summary = (state.text_mean.detach(), state.text_last.detach())
        else:
            if self.threshold is None:
                raise ValueError("dyvte needs a decision threshold: ts.apply(model, artifact, threshold=0.5).")
            exiting = self.score(state).double() >= _log_odds(self.threshold)
        return state.alive & (state.protected | ~exiting.unsqueeze(1))

    # -- cost -----------------------------------------------------------------------------------------
    def analytic_flops(self, site) -> float:
        """FLOPs at a router site (a ``tokensift.flops.SiteShape``), charged when the sample reaches it still
        holding visual tokens: the mean text state (``n_text · d`` adds) and one router call (``2 · in · out`` per
        linear)."""
        if site.prunable == 0:
            return 0.0
        router = self.routers[0]
        per_call = float(sum(2 * m.in_features * m.out_features for m in router.modules() if isinstance(m, nn.Linear)))
        return per_call + site.protected * site.hidden


def check_threshold(value, field: str = "threshold") -> float:
    """``value`` as an exit threshold, or a ``ValueError`` naming ``field``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{field} must be an exit probability in [0, 1] (0 exits at the first router layer, 1 never exits), "
            f"got {value!r}."
        )
    return float(value)


def _log_odds(threshold: float) -> float:
    """``log(t / (1 - t))`` with the ends exact: 0 → -inf (always exit), 1 → +inf (never)."""
    if threshold <= 0.0:
        return -math.inf
    if threshold >= 1.0:
        return math.inf
    return math.log(threshold) - math.log1p(-threshold)


def _site_layer(site) -> int:
    index = site[len(_LLM_SITE_PREFIX) :] if isinstance(site, str) and site.startswith(_LLM_SITE_PREFIX) else ""
    if not index.isdigit():
        raise ValueError(f"DyVTEConfig.sites holds {site!r}; routers sit at llm.<k> sites (k >= 1).")
    layer = int(index)
    if layer < 1:
        raise ValueError(f"DyVTEConfig.sites holds {site!r}; the first router site is llm.1 (pre_llm is no exit).")
    return layer


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"DyVTEConfig.{name} must be a positive integer, got {value!r}.")
