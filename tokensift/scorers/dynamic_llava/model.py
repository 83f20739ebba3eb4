"""Dynamic-LLaVA's vision predictor inside the LLM (``llm.<k>``, default ``llm.2``), on the frozen MLLM.

Per sample, its live visual tokens at the input of decoder layer ``k`` (detached) go through
``LayerNorm → Linear(d → w) → GELU``, are multiplied by their keep policy, then through ``num_blocks``
pre-norm transformer blocks over that sample's visual tokens only (``num_heads`` heads, MLP ``mlp_ratio · w``).
The first half of each feature is local, the second half is averaged over the sample's live visual tokens
(global); ``local ⊕ global → Linear(w → w/2) → GELU → Linear(→ w/4) → GELU → Linear(→ 2)`` gives (keep, drop)
logits and the keep logit is their difference (Dynamic-LLaVA ranks by ``log_softmax(·)[keep]``, the same order).

Inference keeps the top ``num_keep[b]`` visual tokens of sample ``b`` (``TokenMethod.select``). Training
(``keep_policy`` in train mode) draws a hard decision with Gumbel noise, ``state.uniform(0, "dynamic_llava.gumbel")``,
at a temperature annealed geometrically from ``tau_start`` to ``tau_end`` over training (``set_progress``):
``selection="topk"`` keeps exactly the budget's count (Gumbel top-k of the centred logits, so training keeps
what inference keeps), ``selection="threshold"`` is Dynamic-LLaVA's per-token ``gumbel_softmax(hard=True)``
(a variable count, held to the target by the budget term, weight ``budget_weight``, the paper's 100).

With ``text_predictor`` the method also has Dynamic-LLaVA's *output-text* predictor (``TextPredictor``:
``LayerNorm → Linear(d → w) → GELU → Linear(→ w/2) → GELU → Linear(→ w/4) → GELU → Linear(→ 2)``, per token, no
attention) at the input of decoder layer ``text_layer`` (default: the first site's layer, the reference's
``sparse_layer``). It decides, for each generated token, whether that token's KV entry stays in the cache of layers
``text_layer`` and later: in ``generate()`` (gather mode) a dropped token is attended to in its own step and then
leaves those layers' caches (``tokensift.reduce_mllm``: per-sample padding and masks, positions unchanged); in training
(mask mode, teacher-forced answers) each answer token's decision (a hard binary Gumbel, straight-through) enters
the later answer tokens' attention there as a key policy, and a budget term pulls each answer's kept fraction to
``text_keep_ratio`` (answers shorter than ``text_min_length`` are kept whole, as the reference's
``output_text_len_for_training``). Inference keeps a token when its keep logit is above its drop logit.

Reference: Osilly/dynamic_llava ``llava/model/language_model/dynamic_modeling_llama.py`` ``VisionPredictor`` and
``TextPredictor`` (``output_text_score_predictor``); deliberate differences in ``docs/methods.md``. Its instruction
(``instruct_score_predictor``) predictor is not part of this method.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensift.scorers.base import MethodConfig, TokenMethod
from tokensift.scorers.learned import (
    binary_gumbel,
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_llm_sites,
    gather_tokens,
    pack_index,
    straight_through_top_k,
    unpack,
)
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import SampleCounter, TokenState, with_sample_index

GUMBEL_STREAM = "dynamic_llava.gumbel"
TEXT_GUMBEL_STREAM = "dynamic_llava.text_gumbel"
SELECTIONS = ("topk", "threshold")


@dataclass
class DynamicLLaVAConfig(MethodConfig):
    """``hidden_size``, ``width`` and ``sites`` are filled from the backbone by ``DynamicLLaVAMethod.for_backbone``."""

    hidden_size: int | None = field(default=None, metadata={"help": "The LLM's hidden size; filled from the backbone."})
    layer: int = field(
        default=2, metadata={"help": "Default site llm.<layer>, the input of that decoder layer (Dynamic-LLaVA: 2)."}
    )
    width: int | None = field(
        default=None,
        metadata={
            "help": "Predictor width d_model (Dynamic-LLaVA: 512 for a 4096-wide LLM; default hidden_size // 8 "
            "rounded down to a multiple of num_heads, at least 2 · num_heads)."
        },
    )
    num_heads: int = field(default=8, metadata={"help": "Attention heads of the predictor's blocks (paper: 8)."})
    num_blocks: int = field(default=2, metadata={"help": "Transformer blocks of the predictor (paper: 2)."})
    mlp_ratio: float = field(default=4.0, metadata={"help": "MLP width of each block over width (paper: 2048 / 512)."})
    tau_start: float = field(default=1.0, metadata={"help": "Gumbel temperature at the start of training."})
    tau_end: float = field(
        default=0.1, metadata={"help": "Gumbel temperature at the end (annealed geometrically by set_progress)."}
    )
    budget_weight: float = field(
        default=100.0, metadata={"help": "Weight of the budget term (kept fraction vs target)², the paper's 100."}
    )
    selection: str = field(
        default="topk",
        metadata={
            "help": "'topk': training keeps exactly the budget's count (Gumbel top-k), as inference does; "
            "'threshold': Dynamic-LLaVA's per-token hard Gumbel decision, a variable count held by the budget term."
        },
    )
    budget_conditioned: bool = field(
        default=False, metadata={"help": "The head also reads log(keep target) (not in Dynamic-LLaVA)."}
    )
    text_predictor: bool = field(
        default=False,
        metadata={
            "help": "Also build Dynamic-LLaVA's output-text predictor: each generated token (an answer token in "
            "training) gets a keep / drop decision at the input of decoder layer text_layer, and a dropped token's "
            "KV entry leaves the cache of that layer and every later one after its own step."
        },
    )
    text_layer: int | None = field(
        default=None,
        metadata={
            "help": "Decoder layer whose input the output-text predictor reads and from which dropped KV entries "
            "leave the cache (null: the first site's layer, as Dynamic-LLaVA's shared sparse_layer)."
        },
    )
    text_keep_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Training target of each answer's kept fraction of tokens (the budget term; Dynamic-LLaVA's "
            "output_text_keep_rate 0.5). Inference keeps a token when its keep logit wins, whatever this is."
        },
    )
    text_min_length: int = field(
        default=50,
        metadata={
            "help": "Answers with fewer tokens are kept whole in training and add no budget error "
            "(Dynamic-LLaVA's output_text_len_for_training, 50)."
        },
    )

    def __post_init__(self) -> None:
        check_int(self, "hidden_size", optional=True)
        check_int(self, "layer")
        check_int(self, "width", optional=True)
        for name in ("num_heads", "num_blocks"):
            check_int(self, name)
        for name in ("mlp_ratio", "tau_start", "tau_end"):
            check_float(self, name)
        check_float(self, "budget_weight", low_open=False)
        check_choice(self, "selection", SELECTIONS)
        check_bool(self, "budget_conditioned")
        check_bool(self, "text_predictor")
        check_int(self, "text_layer", optional=True)
        check_float(self, "text_keep_ratio", high=1.0)
        check_int(self, "text_min_length")
        if self.width is not None and (self.width % self.num_heads or self.width % 4):
            raise ValueError(
                f"DynamicLLaVAConfig.width ({self.width}) must be a multiple of num_heads ({self.num_heads}) and of 4; "
                "pick another width or leave it null."
            )
        check_llm_sites(self)


def default_width(hidden_size: int, num_heads: int) -> int:
    step = num_heads * 4 // _gcd(num_heads, 4)  # a multiple of num_heads and of 4
    return max(2 * step, min(512, hidden_size // 8) // step * step)


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


class PredictorBlock(nn.Module):
    """A pre-norm transformer block over one sample's visual tokens, keys masked to its live ones."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: Tensor, key_valid: Tensor) -> Tensor:
        b, m, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, m, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid.view(b, 1, 1, m))
        x = x + self.proj(attended.transpose(1, 2).reshape(b, m, c))
        return x + self.mlp(self.norm2(x))


class TextPredictor(nn.Module):
    """``[..., 2]`` (keep, drop) logits of each token's hidden state ``[..., d]``: Dynamic-LLaVA's ``TextPredictor``
    (an MLP per token, no attention)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(dim),
            nn.Linear(dim, width),
            nn.GELU(),
            nn.Linear(width, width // 2),
            nn.GELU(),
            nn.Linear(width // 2, width // 4),
            nn.GELU(),
            nn.Linear(width // 4, 2),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        return self.mlp(hidden)


class VisionPredictor(nn.Module):
    """``[B, M, 2]`` (keep, drop) logits of packed visual tokens ``[B, M, d]``."""

    def __init__(self, dim: int, width: int, num_heads: int, num_blocks: int, mlp_ratio: float, conditioned: bool):
        super().__init__()
        self.conditioned = conditioned
        self.down = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, width), nn.GELU())
        self.blocks = nn.ModuleList(PredictorBlock(width, num_heads, mlp_ratio) for _ in range(num_blocks))
        extra = 1 if conditioned else 0
        self.head = nn.Sequential(
            nn.Linear(width + extra, width // 2),
            nn.GELU(),
            nn.Linear(width // 2, width // 4),
            nn.GELU(),
            nn.Linear(width // 4, 2),
        )

    def forward(self, visual: Tensor, policy: Tensor, valid: Tensor, keep_target: Tensor | None) -> Tensor:
        weight = (policy * valid.to(policy.dtype)).unsqueeze(-1)
        x = self.down(visual) * weight
        # a row without visual tokens attends to its padding (never all-masked, which would give NaN); unused
        key_valid = valid | ~valid.any(dim=1, keepdim=True)
        for block in self.blocks:
            x = block(x, key_valid)
        local, glob = x.chunk(2, dim=-1)
        glob = (glob * weight).sum(dim=1, keepdim=True) / weight.sum(dim=1, keepdim=True).clamp_min(1e-6)
        parts = [local, glob.expand_as(local)]
        if self.conditioned:
            target = keep_target.clamp_min(1e-3).log().to(x.dtype)
            parts.append(target.view(-1, 1, 1).expand(-1, x.shape[1], 1))
        return self.head(torch.cat(parts, dim=-1))


@register
class DynamicLLaVAMethod(TokenMethod):
    name = "dynamic_llava"
    kind = "learned"
    config_class = DynamicLLaVAConfig
    site_kinds = ("llm",)
    description = (
        "Dynamic-LLaVA's vision predictor inside the LLM: 2 transformer blocks over the visual tokens, "
        "local ⊕ global → MLP → keep logit; Gumbel hard decisions, annealed temperature (learned)"
    )

    def __init__(self, config: DynamicLLaVAConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None or cfg.sites is None:
            raise ValueError(
                "DynamicLLaVAConfig needs hidden_size and sites: build it with "
                "DynamicLLaVAMethod.for_backbone(adapter), or load a trained one (ts.apply(model, 'path/to/artifact'))."
            )
        if cfg.width is None:
            cfg.width = default_width(cfg.hidden_size, cfg.num_heads)
        self.predictors = nn.ModuleList(
            VisionPredictor(
                cfg.hidden_size, cfg.width, cfg.num_heads, cfg.num_blocks, cfg.mlp_ratio, cfg.budget_conditioned
            )
            for _ in cfg.sites
        )
        if cfg.text_predictor:
            if cfg.text_layer is None:
                cfg.text_layer = int(cfg.sites[0].split(".")[1])
            self.output_text_predictor = TextPredictor(cfg.hidden_size, cfg.width)
        self.tau = cfg.tau_start
        self._samples = SampleCounter()  # Gumbel noise for states without a sample index: rows in arrival order

    @classmethod
    def for_backbone(cls, adapter, config: DynamicLLaVAConfig | None = None) -> DynamicLLaVAMethod:
        config = replace(config) if config is not None else DynamicLLaVAConfig()  # the caller's config stays as given
        if config.hidden_size is None:
            config.hidden_size = adapter.hidden_size
        if config.width is None:
            config.width = default_width(config.hidden_size, config.num_heads)
        if config.sites is None:
            if not 1 <= config.layer < adapter.num_layers:
                raise ValueError(
                    f"DynamicLLaVAConfig.layer={config.layer} is not an LLM site of this model: give 1 .. "
                    f"{adapter.num_layers - 1} (llm.<layer> is the input of decoder layer <layer>)."
                )
            config.sites = [f"llm.{config.layer}"]
        check_llm_sites(config, adapter.num_layers)
        if config.text_predictor and config.text_layer is not None and config.text_layer >= adapter.num_layers:
            raise ValueError(
                f"DynamicLLaVAConfig.text_layer={config.text_layer} is not a decoder layer of this model: give 1 .. "
                f"{adapter.num_layers - 1} (or null: the first site's layer)."
            )
        return cls(config)

    # -- the output-text predictor: which generated tokens' KV entries stay ---------------------------------
    @property
    def kv_eviction_layer(self) -> int | None:
        """The decoder layer from which the output-text predictor's dropped tokens leave the KV cache (``None``
        without ``text_predictor``); ``tokensift.reduce_mllm`` reads it."""
        return self.config.text_layer if self.config.text_predictor else None

    @property
    def has_unused_parameters(self) -> bool:
        """With the output-text predictor, a step whose answers are all shorter than ``text_min_length`` gives it
        no gradient (DDP must look for unused parameters)."""
        return self.config.text_predictor

    def generated_keep_logits(self, tokens) -> Tensor:
        """``[B, T]`` keep logit (keep minus drop) of each token of ``tokens`` (a ``GeneratedTokens``: the hidden
        states at the input of ``text_layer``, detached)."""
        predictor = self._text_predictor()
        dtype = predictor.mlp[1].weight.dtype
        pair = predictor(tokens.hidden.detach().to(dtype))
        return pair[..., 0] - pair[..., 1]

    def generated_keep(self, tokens) -> Tensor:
        """Inference: ``[B, T]`` bool, keep the candidate's KV entry when its keep logit wins (Dynamic-LLaVA's
        ``logit[keep] > logit[drop]``)."""
        return (self.generated_keep_logits(tokens) > 0) & tokens.candidates

    def generated_keep_policy(self, tokens) -> Tensor:
        """Training: ``[B, T]`` keep policy over the sequence, 1 off the candidates (the answer tokens). In train
        mode a hard binary Gumbel decision per answer token (``tokens.uniform``, temperature ``tau``; Dynamic-LLaVA's
        two-class ``gumbel_softmax(hard=True)``), straight-through; answers shorter than ``text_min_length`` are
        kept whole. In eval mode the inference decision, as 0 / 1."""
        candidates = tokens.candidates
        logits = self.generated_keep_logits(tokens)
        if self.training:
            decision = binary_gumbel(logits, tokens.uniform(0, TEXT_GUMBEL_STREAM).to(logits.device), self.tau)
        else:
            decision = (logits > 0).to(logits.dtype)
        short = (candidates.sum(1) < self.config.text_min_length).unsqueeze(1)
        return torch.where(candidates & ~short, decision, torch.ones_like(decision))

    def generated_keep_target(self, num: Tensor) -> Tensor:
        """``[B]`` answer tokens each sample should keep in training: ``text_keep_ratio`` of an answer of at least
        ``text_min_length`` tokens, every token of a shorter one (kept whole, so its budget error is 0)."""
        num = num.float()
        return torch.where(num >= self.config.text_min_length, num * self.config.text_keep_ratio, num)

    def _text_predictor(self) -> TextPredictor:
        if not self.config.text_predictor:
            raise ValueError("this dynamic_llava has no output-text predictor; build it with text_predictor=True.")
        return self.output_text_predictor

    @property
    def keeps_budget_count(self) -> bool:
        """``topk`` keeps the budget's count in training too; ``threshold`` keeps a variable count."""
        return self.config.selection == "topk"

    def set_progress(self, fraction: float) -> None:
        """Anneal the Gumbel temperature: ``tau_start · (tau_end / tau_start) ** fraction`` (the paper's schedule)."""
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"set_progress: fraction must be the share of training done, in [0, 1], got {fraction!r}.")
        cfg = self.config
        self.tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** float(fraction)

    def keep_logits(self, state: TokenState) -> tuple[Tensor, Tensor]:
        """``[B, N, 2]`` (keep, drop) logits of the live visual tokens (0 elsewhere) and the ``[B, N]`` keep logit."""
        require(state, "valid", self.name)
        try:
            predictor = self.predictors[self.config.sites.index(state.site)]
        except ValueError:
            raise ValueError(
                f"dynamic_llava has predictors at {self.config.sites}, not at {state.site}; run it at its own sites."
            ) from None
        candidates = state.prunable
        index, valid = pack_index(candidates)
        dtype = predictor.head[0].weight.dtype
        visual = gather_tokens(state.hidden.detach().to(dtype), index)
        policy = valid.to(dtype) if state.policy is None else state.policy.to(dtype).gather(1, index)
        target = None if state.keep_target is None else state.keep_target.to(visual.device)
        if predictor.conditioned and target is None:
            raise ValueError(f"{self.name} with budget_conditioned reads state.keep_target; the handle sets it.")
        packed = predictor(visual, policy, valid, target)
        width = state.hidden.shape[1]
        pair = torch.stack([unpack(packed[..., j], index, valid, width) for j in range(2)], dim=-1)
        return pair, pair[..., 0] - pair[..., 1]

    def score(self, state: TokenState) -> Tensor:
        return self.keep_logits(state)[1]

    def keep_policy(self, state: TokenState, num_keep: Tensor) -> Tensor:
        if not self.training:
            return super().keep_policy(state, num_keep)
        logits = self.score(state)
        uniform = with_sample_index(state, self._samples).uniform(0, stream=GUMBEL_STREAM)
        candidates = state.prunable
        if self.config.selection == "topk":
            decision = straight_through_top_k(logits, candidates, num_keep, uniform, self.tau)
        else:
            decision = binary_gumbel(logits, uniform, self.tau) * candidates.to(logits.dtype)
        decision = torch.where(state.protected, torch.ones_like(decision), decision)
        return decision if state.policy is None else decision * state.policy

    def analytic_flops(self, site) -> float:
        """One sample at one site (a ``tokensift.flops.SiteShape``, ``v`` visual tokens, width ``d``; predictor width
        ``w``, ``L`` blocks of MLP width ``m``): input norm ``3 v d`` and down-projection ``2 v d w``; per block two
        norms ``6 v w``, qkv and output projections ``8 v w²``, scores and weighted sum ``4 v² w`` plus the softmax
        ``6 H v²``, its MLP ``4 v w m``; the global mean ``v w / 2``; the head's linears per token."""
        v, d = site.prunable, site.hidden
        if v == 0:
            return 0.0
        cfg = self.config
        w, heads = cfg.width, cfg.num_heads
        m = int(w * cfg.mlp_ratio)
        block = site.normalize(2 * v, w) + site.matmul(v, w, 4 * w) + 4.0 * v * v * w + 6.0 * heads * v * v
        block += site.matmul(v, w, m) + site.matmul(v, m, w)
        head = sum(site.matmul(v, m_.in_features, m_.out_features) for m_ in self.predictors[0].head if _linear(m_))
        return float(site.normalize(v, d) + site.matmul(v, d, w) + cfg.num_blocks * block + v * w / 2 + head)


def _linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear)
