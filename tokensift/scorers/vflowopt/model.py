"""VFlowOpt: keep the patches the tower's global tokens attend to, with hyperparameters fitted by information flow.

VFlowOpt (Yang et al., ICCV 2025, arXiv 2508.05211; code: sihany077/VFlowOpt,
``src/LLaVA-OneVision/llava/model/multimodal_encoder/siglip_encoder.py`` ``SigLipEncoderLayer.forward`` for the
importance map, ``src/lmms_eval-0.2.4/lmms_eval/models/llava_ov_opt_all.py`` ``generate_until`` for the
calibration) scores a tower block's tokens by their *context relevance*: average the attention over heads, take
the attention each token receives (averaged over the queries), call the tokens receiving more than ``t`` times the
mean the *global tokens*, and score every token by the attention the global tokens pay it (their rows averaged),
plus ``alpha · softmax(patch entropy)``: the grey-level histogram entropy of each token's pixel patch
(``SigLipVisionEmbeddings.forward``: ``(pixels · 255)`` cast to ``uint8``, the three channels weighted 0.3333,
rounded, a 256-bin histogram, ``−Σ p log₂(p + 1e-10)``), a softmax over the patches. The pixels come from the
handle (``needs_pixels``: each token's patch of the forward's ``pixel_values``, in the tower's dtype as the
reference casts them). The hyperparameters (``t``, ``alpha``, the keep ratio of each pruning stage) are then fitted
on a few samples to keep the pruned model's last-token representation close to the unpruned one's:
``tokensift.calibration.calibrate``.

Where tokensift differs (``docs/methods.md``): the entropy softmax runs over the live patches (the reference prunes
once, when all are live: the same there), with the model's patch size (the reference: 14, SigLIP's), and [CLS] /
registers get no prior. An empty global set (``t`` above the largest received / mean) keeps the most-attended token
as the only global one, where the reference averages an empty set (NaN). With [CLS] (ViT, CLIP) it is a token like
the others: a query, and a global token when it receives enough (the reference's SigLIP has none). The
reference prunes after the tower with the map of block ``k``, recycling the pruned tokens by grid cell on
LLaVA-OneVision's any-resolution crops only; here each site keeps its budget's count at the block's output, by top
score, in every path (the reference's single-image and video paths recycle nothing either).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.scorers.vision_sites import spread_vit_sites
from tokensift.state import TokenState


@dataclass
class VFlowOptConfig(MethodConfig):
    """VFlowOpt's options.

    - ``global_threshold`` (``t``, VFlowOpt's ``vit_t``, searched in ``[0, 50]``): a token is *global* when the
      attention it receives (averaged over heads and live queries) exceeds ``t`` times the mean over live tokens;
      tokens are scored by the attention of the global ones. ``0``: every token is global (attention received).
    - ``alpha`` (VFlowOpt's ``alpha_v``, searched in ``[-1, 1]``; default 0 as its unsearched config): weight of
      the patch-entropy prior ``softmax(entropy)`` added to the scores; 0 leaves the pixels unread.
    - ``num_stages``: how many sites the default spreads the pruning over (equal depth fractions, progressive
      pruning); ``sites=`` replaces it.
    - ``keep_ratios``: the cumulative keep fraction per site that ``calibrate`` fitted (``{site: fraction}``). The
      method does not read it (the handle's budget sets every count): pass it as the budget,
      ``ts.apply(model, VFlowOptMethod(config), keep_ratio=config.keep_ratios)``.
    """

    global_threshold: float = 7.0
    alpha: float = 0.0
    num_stages: int = 2
    keep_ratios: dict[str, float] | None = None

    def __post_init__(self) -> None:
        t = self.global_threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"VFlowOptConfig.global_threshold must be a finite number >= 0, got {t!r}.")
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise ValueError(f"VFlowOptConfig.alpha must be a finite number (VFlowOpt searches [-1, 1]), got {alpha!r}")
        stages = self.num_stages
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"VFlowOptConfig.num_stages must be a positive integer, got {stages!r}.")
        ratios = self.keep_ratios
        if ratios is None:
            return
        if not isinstance(ratios, Mapping) or not ratios:
            raise ValueError(
                f"VFlowOptConfig.keep_ratios must be a non-empty {{site: fraction}} mapping, got {ratios!r}."
            )
        for site, ratio in ratios.items():
            if not isinstance(site, str) or isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
                raise ValueError(f"VFlowOptConfig.keep_ratios must map site names to fractions, got {ratios!r}.")
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"VFlowOptConfig.keep_ratios[{site!r}] must be in (0, 1], got {ratio!r}.")
        if self.sites is not None and set(ratios) != set(self.sites):
            raise ValueError(
                f"VFlowOptConfig.keep_ratios names sites {sorted(ratios)} but sites is {list(self.sites)}; "
                "give one fraction per site."
            )


def global_token_attention(attention: Tensor, alive: Tensor, threshold: float) -> Tensor:
    """``[B, N]`` VFlowOpt's context relevance: the attention the global tokens pay each token.

    ``attention`` ``[B, H, N, N]`` probabilities, ``alive`` ``[B, N]`` bool (queries and candidates). A live token
    is global when the attention it receives (head-averaged, averaged over live queries) exceeds ``threshold``
    times the mean over live tokens, or when it receives the most (so the set is never empty).
    """
    mean_heads = attention.float().mean(dim=1)  # [B, N(query), N(key)]
    live = alive.float()
    count = live.sum(dim=1, keepdim=True).clamp_min(1.0)
    received = (mean_heads * live.unsqueeze(-1)).sum(dim=1) / count  # [B, N]
    received = received.masked_fill(~alive, float("-inf"))
    mean = received.masked_fill(~alive, 0.0).sum(dim=1, keepdim=True) / count
    top = received.amax(dim=1, keepdim=True)
    is_global = alive & ((received > threshold * mean) | (received >= top))
    weights = is_global.float()
    return (mean_heads * weights.unsqueeze(-1)).sum(dim=1) / weights.sum(dim=1, keepdim=True)


GREY_WEIGHT = 0.3333  # VFlowOpt's weight of each of the three channels in the grey level


def patch_entropy(patch_pixels: Tensor) -> Tensor:
    """``[B, N]`` VFlowOpt's patch entropy (``SigLipVisionEmbeddings.forward``) of ``patch_pixels`` ``[B, N, C, p·p]``.

    Op for op as the reference: ``(pixels · 255)`` cast to ``uint8`` (in the pixels' dtype; values outside
    ``[0, 256)`` wrap as torch's cast does), back to float32, the channels weighted 0.3333 each (``1 / C`` unless
    ``C = 3``) and summed, rounded to a grey level, a 256-bin histogram per patch and ``−Σ p log₂(p + 1e-10)``.
    """
    b, n, channels, _ = patch_pixels.shape
    levels = (patch_pixels * 255).to(torch.uint8).to(torch.float32)
    weight = GREY_WEIGHT if channels == 3 else 1.0 / channels
    grey = (levels * torch.full((1, 1, channels, 1), weight, device=levels.device)).sum(dim=2)
    grey = grey.round().long().clamp_(0, 255)
    hist = torch.zeros(b, n, 256, device=grey.device).scatter_add_(2, grey, torch.ones_like(grey, dtype=torch.float32))
    prob = hist / hist.sum(dim=-1, keepdim=True)
    return -(prob * torch.log2(prob + 1e-10)).sum(dim=-1)


def entropy_prior(patch_pixels: Tensor, patches: Tensor) -> Tensor:
    """``[B, N]`` the softmax of :func:`patch_entropy` over ``patches`` (``[B, N]`` bool: the live patches), 0 for the
    other tokens."""
    entropy = patch_entropy(patch_pixels).masked_fill(~patches, float("-inf"))
    return entropy.softmax(dim=-1).nan_to_num(0.0)


@register
class VFlowOptMethod(TokenMethod):
    name = "vflowopt"
    config_class = VFlowOptConfig
    needs_attention = True
    needs_pixels = True
    num_default_sites = 2
    description = (
        "keep the patches the tower's global tokens (received attention > t x mean) attend to, plus alpha x "
        "softmax(patch entropy), with t, alpha and the stage ratios fitted by calibrate() (VFlowOpt)"
    )

    def default_sites(self, adapter) -> list[str]:
        return spread_vit_sites(adapter, self.config.num_stages)

    def default_mllm_sites(self, adapter) -> list[str]:
        return self.default_sites(adapter)

    def score(self, state: TokenState) -> Tensor:
        attention = require(state, "attention", self.name)
        scores = global_token_attention(attention, state.alive, float(self.config.global_threshold))
        alpha = float(self.config.alpha)
        if alpha == 0.0:
            return scores
        pixels = require(state, "patch_pixels", self.name)
        return scores + alpha * entropy_prior(pixels, state.prunable)

    def analytic_flops(self, site) -> float:
        """FLOPs at a site (a ``tokensift.flops.SiteShape``) beyond the captured map (charged by the bench for
        ``needs_attention``): the map averaged over heads ``H n²``, the attention received as a weighted sum over
        the live queries ``2 n²`` and the global tokens' rows as another ``2 n²``. The entropy prior (``alpha ≠ 0``)
        is per-pixel arithmetic and a histogram, a few operations per pixel (no product), left out as the counter
        leaves out norms and activations."""
        n = site.tokens
        return float(site.heads * n * n + 4 * n * n)
