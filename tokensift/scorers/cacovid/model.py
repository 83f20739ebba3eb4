"""CaCoVID's token-combination policy before the LLM (``pre_llm``), trained by reward with GRPO
(``tokensift.trainer.GRPOTrainer``).

Each sample's tokens at the LLM's input (its visual tokens and its text: the question and the prompt around it,
padding and a teacher-forced answer excluded, detached) go through one decoder layer initialised from the LLM's
first one (``for_backbone`` copies its weights), bidirectional over the sample's own tokens, with rotary
positions at the tokens' places in the sample's sequence; then an RMS norm and CaCoVID's token head
``d → d/2 → d/4 → d/8 → d/16 → 2`` (SiLU between) on the visual tokens. The keep logit is the difference of the two
outputs, so ``p = sigmoid(logit)`` is the two-way softmax's keep probability, and ``softmax(logit)`` over a
sample's visual tokens is CaCoVID's sampling distribution.

Inference keeps the top ``num_keep[b]`` visual tokens by logit (``TokenMethod.select``). Inside ``sampling()``
(a GRPO rollout, gather mode) each row instead draws ``num_keep[b]`` tokens without replacement from
``softmax(logit)`` (``tokensift.scorers.learned.sample_without_replacement``, noise ``state.uniform(0,
"cacovid.sample")``) and the method records what the trainer needs to recompute the log-probabilities with
gradient (``Rollout``: the packed, detached policy inputs, the old logits and the sampled mask).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tokensift.scorers.base import MethodConfig, TokenMethod, check_scores, top_k_mask
from tokensift.scorers.learned import (
    check_bool,
    check_float,
    check_int,
    gather_tokens,
    pack_index,
    sample_without_replacement,
    unpack,
)
from tokensift.scorers.multimodal import require
from tokensift.scorers.registry import register
from tokensift.state import SampleCounter, TokenState, with_sample_index

SAMPLE_STREAM = "cacovid.sample"


@dataclass
class CaCoVIDConfig(MethodConfig):
    """The decoder layer's shape is the LLM's first layer's; ``CaCoVIDMethod.for_backbone`` fills it."""

    hidden_size: int | None = field(
        default=None, metadata={"help": "The LLM's hidden size (its input embeddings); filled from the backbone."}
    )
    intermediate_size: int | None = field(
        default=None, metadata={"help": "The policy layer's MLP width (the LLM's; default 4 x hidden_size)."}
    )
    num_attention_heads: int = field(default=1, metadata={"help": "Query heads of the policy layer (the LLM's)."})
    num_key_value_heads: int | None = field(
        default=None, metadata={"help": "Key / value heads (the LLM's grouped-query count; default: the query heads)."}
    )
    head_dim: int | None = field(
        default=None, metadata={"help": "Width of one head (default hidden_size / num_attention_heads)."}
    )
    rms_norm_eps: float = field(default=1e-6, metadata={"help": "Epsilon of the RMS norms (the LLM's)."})
    rope_theta: float = field(default=10000.0, metadata={"help": "Base of the rotary position angles (the LLM's)."})
    qkv_bias: bool = field(default=False, metadata={"help": "Biases on q / k / v (Qwen2: true, Llama: false)."})
    output_bias: bool = field(default=False, metadata={"help": "Bias on the attention's output projection."})
    mlp_bias: bool = field(default=False, metadata={"help": "Biases in the layer's gated MLP."})
    head_depth: int = field(
        default=4,
        metadata={"help": "Halvings of the token head before its 2-way output (CaCoVID: 4, d → d/16 → 2)."},
    )
    init_from_llm: bool = field(
        default=True,
        metadata={"help": "for_backbone copies the LLM's first decoder layer into the policy layer (CaCoVID)."},
    )

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_key_value_heads", "head_dim"):
            check_int(self, name, optional=True)
        check_int(self, "num_attention_heads")
        check_int(self, "head_depth", minimum=0)
        check_float(self, "rms_norm_eps")
        check_float(self, "rope_theta")
        for name in ("qkv_bias", "output_bias", "mlp_bias", "init_from_llm"):
            check_bool(self, name)
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"CaCoVIDConfig.num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.sites is not None and list(self.sites) != ["pre_llm"]:
            raise ValueError(
                f"CaCoVIDConfig.sites must be ['pre_llm'] (or null), got {self.sites!r}: the policy reads the LLM's "
                "input embeddings."
            )


@dataclass
class PolicyInputs:
    """A batch's tokens as the policy reads them, packed per row (``[B, M, ...]``, detached)."""

    hidden: Tensor  # [B, M, D] the row's valid tokens in sequence order
    valid: Tensor  # [B, M] bool: a real token (not padding of the packing)
    positions: Tensor  # [B, M] long: its place in the sample's own sequence (rotary angle)
    visual: Tensor  # [B, M] bool: a candidate visual token
    index: Tensor  # [B, M] long: its slot in the state

    def every(self, step: int) -> PolicyInputs:
        """Rows ``0, step, 2·step, ...``: the first of each group of ``step`` consecutive rows."""
        return PolicyInputs(**{name: getattr(self, name)[::step] for name in self.__dataclass_fields__})


@dataclass
class Rollout:
    """What a sampling forward recorded: enough to recompute the per-token log-probabilities with gradient."""

    inputs: PolicyInputs
    logits: Tensor  # [B, M] the keep logits the draw used (no gradient)
    mask: Tensor  # [B, M] bool: the sampled combination (visual tokens kept)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class PolicyAttention(nn.Module):
    """Grouped-query self-attention with the Llama / Qwen2 parameter names (``q_proj`` ... ``o_proj``)."""

    def __init__(self, cfg: CaCoVIDConfig, head_dim: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.heads * head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(d, self.kv_heads * head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(d, self.kv_heads * head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.heads * head_dim, d, bias=cfg.output_bias)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], bias: Tensor) -> Tensor:
        b, m, _ = x.shape
        q = self.q_proj(x).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, m, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1).to(q.dtype) for t in rotary)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        return self.o_proj(out.transpose(1, 2).reshape(b, m, -1))


class PolicyMLP(nn.Module):
    def __init__(self, cfg: CaCoVIDConfig):
        super().__init__()
        d, width = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, width, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, width, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(width, d, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PolicyLayer(nn.Module):
    """A pre-norm decoder layer laid out as Llama's / Qwen2's (its ``state_dict`` loads theirs), run without the
    causal mask: every token attends to every real token of its own row."""

    def __init__(self, cfg: CaCoVIDConfig, head_dim: int):
        super().__init__()
        self.self_attn = PolicyAttention(cfg, head_dim)
        self.mlp = PolicyMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor], bias: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rotary, bias)
        return x + self.mlp(self.post_attention_layernorm(x))


def token_head(dim: int, depth: int) -> nn.Sequential:
    """CaCoVID's ``token_compress``: ``depth`` halvings with SiLU, then a 2-way output (widths at least 2)."""
    layers: list[nn.Module] = []
    width = dim
    for _ in range(depth):
        narrower = max(2, width // 2)
        layers += [nn.Linear(width, narrower), nn.SiLU()]
        width = narrower
    layers.append(nn.Linear(width, 2))
    return nn.Sequential(*layers)


@register
class CaCoVIDMethod(TokenMethod):
    name = "cacovid"
    kind = "learned"
    config_class = CaCoVIDConfig
    site_kinds = ("pre_llm",)
    trained_by_reward = True  # its sampled decision has no gradient: GRPOTrainer, not MLLMScorerTrainer
    description = (
        "CaCoVID's combination policy before the LLM: one decoder layer from the LLM's first over visual tokens and "
        "question, MLP head → keep probability; trained by GRPO on answer correctness (learned)"
    )

    def __init__(self, config: CaCoVIDConfig | None = None):
        super().__init__(config)
        cfg = self.config
        if cfg.hidden_size is None:
            raise ValueError(
                "CaCoVIDConfig needs hidden_size: build it with CaCoVIDMethod.for_backbone(adapter), or load a trained "
                "one (ts.apply(model, 'path/to/artifact'))."
            )
        if cfg.sites is None:
            cfg.sites = ["pre_llm"]
        if cfg.intermediate_size is None:
            cfg.intermediate_size = 4 * cfg.hidden_size
        if cfg.num_key_value_heads is None:
            cfg.num_key_value_heads = cfg.num_attention_heads
        if cfg.head_dim is None:
            if cfg.hidden_size % cfg.num_attention_heads:
                raise ValueError(
                    f"CaCoVIDConfig.num_attention_heads ({cfg.num_attention_heads}) must divide hidden_size "
                    f"({cfg.hidden_size}), or give head_dim."
                )
            cfg.head_dim = cfg.hidden_size // cfg.num_attention_heads
        if cfg.head_dim % 2:
            raise ValueError(f"CaCoVIDConfig.head_dim must be even (rotary pairs), got {cfg.head_dim}.")
        self.layer = PolicyLayer(cfg, cfg.head_dim)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = token_head(cfg.hidden_size, cfg.head_depth)
        self.register_buffer(
            "inv_freq",
            1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim),
            persistent=False,
        )
        self.sampling_rollouts: list[Rollout] | None = None  # a list inside sampling(): rollouts record there
        self._greedy_rows: Tensor | None = None  # inside sampling(): rows that keep the top-k instead
        self._group_size = 1  # inside sampling(): rows in groups of copies of one sample
        self._samples = SampleCounter()  # noise for states without a sample index: rows in arrival order

    @classmethod
    def for_backbone(cls, adapter, config: CaCoVIDConfig | None = None) -> CaCoVIDMethod:
        """The policy sized as ``adapter``'s LLM, its layer a copy of the LLM's first decoder layer (CaCoVID's
        initialisation) when ``init_from_llm``."""
        config = replace(config) if config is not None else CaCoVIDConfig()  # the caller's config stays as given
        text = adapter.text_config
        layer = adapter.layers[0]
        attention, mlp = layer.self_attn, layer.mlp
        config.hidden_size = config.hidden_size or adapter.hidden_size
        if config.hidden_size != adapter.hidden_size:
            raise ValueError(
                f"CaCoVIDConfig.hidden_size is {config.hidden_size} but the LLM's is {adapter.hidden_size}: leave it "
                "null (the policy reads the LLM's input embeddings)."
            )
        config.intermediate_size = int(mlp.gate_proj.out_features)
        config.num_attention_heads = int(text.num_attention_heads)
        config.num_key_value_heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
        config.head_dim = int(attention.q_proj.out_features // config.num_attention_heads)
        config.rms_norm_eps = float(text.rms_norm_eps)
        rope = getattr(text, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(
                f"cacovid's policy layer uses plain rotary angles but the LLM's rope_type is {rope['rope_type']!r}: "
                "use a backbone with default rotary embeddings."
            )
        config.rope_theta = float(rope.get("rope_theta", getattr(text, "rope_theta", 10000.0)))
        config.qkv_bias = attention.q_proj.bias is not None
        config.output_bias = attention.o_proj.bias is not None
        config.mlp_bias = mlp.gate_proj.bias is not None
        if config.sites is None:
            config.sites = ["pre_llm"]
        method = cls(config)
        if config.init_from_llm:
            method.layer.load_state_dict({k: v.detach().float() for k, v in layer.state_dict().items()})
        return method

    # -- the policy ------------------------------------------------------------------------------
    def policy_inputs(self, state: TokenState) -> PolicyInputs:
        """The state's tokens as the policy reads them: each row's valid tokens packed in order, detached."""
        valid = require(state, "valid", self.name)
        index, packed_valid = pack_index(valid)
        dtype = self.norm.weight.dtype
        key = state.orig_index if state.token_key is None else state.token_key
        return PolicyInputs(
            hidden=gather_tokens(state.hidden.detach().to(dtype), index),
            valid=packed_valid,
            positions=key.gather(1, index).clamp_min(0) * packed_valid,
            visual=state.prunable.gather(1, index) & packed_valid,
            index=index,
        )

    def keep_logits(self, inputs: PolicyInputs, group_size: int = 1) -> Tensor:
        """``[B, M]`` float32 keep logits of the packed tokens (meaningful at ``inputs.visual``).

        ``group_size`` > 1: the rows come in consecutive groups of copies of one sample (a GRPO rollout's
        combinations of one prompt); the policy runs once per group and its logits are repeated, since the copies
        differ only in what is sampled from them."""
        if group_size > 1:
            if inputs.hidden.shape[0] % group_size:
                raise ValueError(
                    f"keep_logits: {inputs.hidden.shape[0]} rows are not groups of group_size={group_size}."
                )
            return self.keep_logits(inputs.every(group_size)).repeat_interleave(group_size, dim=0)
        angles = inputs.positions.float().unsqueeze(-1) * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)
        rotary = (angles.cos(), angles.sin())
        allowed = inputs.valid.unsqueeze(1).expand(-1, inputs.valid.shape[1], -1)  # [B, M(query), M(key)]
        bias = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf")).unsqueeze(1)
        hidden = self.layer(inputs.hidden, rotary, bias)
        two_way = self.head(self.norm(hidden)).float()
        return (two_way[..., 1] - two_way[..., 0]) * inputs.valid

    def score(self, state: TokenState) -> Tensor:
        """``[B, N]`` keep logits of the live visual tokens (0 at every other slot)."""
        inputs = self.policy_inputs(state)
        logits = self.keep_logits(inputs)
        return unpack(logits, inputs.index, inputs.visual, state.hidden.shape[1])

    # -- rollouts --------------------------------------------------------------------------------
    @contextmanager
    def sampling(self, greedy_rows: Tensor | None = None, group_size: int = 1) -> Iterator[list[Rollout]]:
        """Within the block ``select`` samples each row's combination from the policy and records a ``Rollout``
        per call into the yielded list (a GRPO rollout, gather mode). Rows marked in ``greedy_rows`` (``[B]`` bool)
        keep the policy's top-k instead, the combination inference keeps (CaCoVID's first token-mode sample).
        ``group_size``: the rows are consecutive groups of that many copies of one sample (``keep_logits``)."""
        self.sampling_rollouts, self._greedy_rows, self._group_size = [], greedy_rows, group_size
        try:
            yield self.sampling_rollouts
        finally:
            self.sampling_rollouts, self._greedy_rows, self._group_size = None, None, 1

    def select(self, state: TokenState, num_keep: Tensor) -> Tensor:
        if self.sampling_rollouts is None:
            return super().select(state, num_keep)
        inputs = self.policy_inputs(state)
        with torch.no_grad():
            logits = self.keep_logits(inputs, self._group_size)
        # NaN logits would turn into zero probabilities and silently random draws
        check_scores(logits, inputs.visual, self.name, state.site)
        uniform = with_sample_index(state, self._samples).uniform(0, stream=SAMPLE_STREAM).gather(1, inputs.index)
        # softmax over a row's visual tokens: CaCoVID's sampling distribution (the two-way softmax's odds)
        probs = logits.masked_fill(~inputs.visual, float("-inf")).softmax(dim=1).nan_to_num(0.0)
        mask = sample_without_replacement(probs, num_keep, uniform, candidates=inputs.visual)
        keep = unpack(mask.float(), inputs.index, inputs.valid, state.hidden.shape[1]) > 0.5
        if self._greedy_rows is not None:
            scores = unpack(logits, inputs.index, inputs.visual, state.hidden.shape[1])
            greedy = self._greedy_rows.to(keep.device).unsqueeze(1)
            keep = torch.where(greedy, top_k_mask(scores, state, num_keep), keep)
            mask = torch.where(greedy.to(mask.device), keep.gather(1, inputs.index) & inputs.visual, mask)
        self.sampling_rollouts.append(Rollout(inputs=inputs, logits=logits, mask=mask))
        return keep | (state.protected & state.alive)

    def analytic_flops(self, site) -> float:
        """One sample at ``pre_llm`` (``n`` tokens, ``v`` visual, width ``d``; the layer's heads ``h`` / ``h_kv`` of
        width ``e``, MLP width ``f``): three RMS norms ``9 n d``; q / k / v / o ``2 n d e (2h + 2h_kv)``; scores and
        weighted sum ``4 n² h e``, softmax ``6 h n²``; the gated MLP ``6 n d f``; the token head on all ``n`` tokens
        (``keep_logits`` runs it on every packed token; only the visual ones' logits are read)."""
        cfg = self.config
        n, d = site.prunable + site.protected, site.hidden
        if site.prunable == 0:
            return 0.0
        h, kv, e, f = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        projections = site.matmul(n, d, e * (2 * h + 2 * kv))
        attention = 2 * site.matmul(n, e, n) * h + 6.0 * h * n * n
        mlp = site.matmul(n, d, 3 * f)
        head = sum(site.matmul(n, m.in_features, m.out_features) for m in self.head if isinstance(m, nn.Linear))
        return float(3 * site.normalize(n, d) + projections + attention + mlp + head)
