"""One attention function wrapping the model's own, so no modeling file is forked.

transformers routes every attention call through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.
We register ``tokensift+<base>`` which, per call, reads what our layer pre-hooks left on the attention
module as ``module.tokensift_call`` (an attribute, because not every model passes ``**kwargs`` down to
its attention function):

- ``policy`` ``[B, N]``: DynamicViT's policy attention. Keys with policy 0 are invisible to
  every query except themselves, renormalised with the policy so the gradient reaches a straight-through
  hard decision (an additive ``log p`` bias would be ``-inf`` with an infinite gradient there).
- ``policy_bias`` ``[B, N]``: a keep policy as an additive ``log p`` bias on each key (``policy_bias`` builds it;
  ``p = 0`` blocked), every query's own key left unbiased, merged with the model's mask into one float mask that
  the base kernel (SDPA included) takes: what multimodal LLMs see in mask (training) mode for soft policies and
  for hard ones without a gradient (then exactly what gather mode computes). A straight-through hard policy goes
  to ``policy`` instead (``needs_policy_attention``), whose renormalised softmax keeps a gradient at ``p = 0``.
- ``key_bias`` ``[B, N]``: added to every query's logits for that key (ToMe's ``log size``).
- ``chunks`` (an iterator of such dicts): a packed sequence whose layer calls the attention function once per
  chunk, in order (Qwen2-VL's tower, one call per ``cu_seqlens`` frame): each call takes the next entry.
- ``segments`` (a ``Segments``): a frame-batched tower's packed rows (Molmo2 after a ``vit.<i>`` site): the rows hold
  the frames' kept patches, and a patch attends only to its own frame's (block-diagonal attention, one block per
  original frame, over the rows read end to end); with ``key_bias`` ``[rows, length]`` in that layout.
  ``Segments.kernel`` says how: ``"sdpa"`` one call of the model's own kernel per segment (what Qwen2-VL's tower does
  per frame without flash), ``"flex"`` one ``flex_attention`` call per layer with a document mask (compiled; see
  ``docs/design.md``).
- ``capture`` (a dict): store this layer's attention probabilities and head-averaged keys, so a
  method that scores with attention pays for them at that one layer only; the layer's output still
  comes from the base kernel. With ``capture_values`` (True) also the values, per key/value head (FlowCut).

Without any of them (and, with ``capture``, for the layer's output), the call goes to exactly the function the
model would have called: the registered kernel (SDPA, flash, ...) or, for ``eager``, the ``eager_attention_forward``
of the attention module's own modeling file (transformers has no shared eager kernel; each model passes its own
as the fallback of ``ALL_ATTENTION_FUNCTIONS.get_interface``). So ``keep_ratio=1`` reproduces the unpruned model
bit for bit in every dtype: an eager kernel of our own, however close, rounds differently in bf16 / fp16.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

PREFIX = "tokensift+"


def additive_mask(attention_mask: Tensor | None, query: Tensor, key: Tensor, causal: bool = False) -> Tensor | None:
    """The mask as a float bias to add to attention logits, whatever form the model built it in.

    SDPA masks are boolean (True = attend) and a causal decoder may pass none at all, relying on the kernel's
    ``is_causal``; eager masks are already additive. Blocked entries get the dtype's minimum rather than
    ``-inf``, as transformers' eager masks do: a fully masked row (a padding query) then stays finite, where
    ``-inf`` would make it NaN and the NaN would reach every later layer through that slot's keys and values.
    """
    if attention_mask is None:
        if not causal or query.shape[-2] == 1:
            return None
        q_len, k_len = query.shape[-2], key.shape[-2]
        # lower-right aligned: the last query sees every key (the cache holds k_len - q_len earlier tokens)
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
        attention_mask = torch.arange(k_len, device=query.device)[None, :] <= rows
    if attention_mask.dtype == torch.bool:
        blocked = torch.finfo(torch.float32).min
        return torch.zeros(attention_mask.shape, device=query.device).masked_fill(~attention_mask, blocked)
    return attention_mask.float()


def attention_probs(
    query: Tensor, key: Tensor, attention_mask: Tensor | None, scaling: float | None, causal: bool = False
) -> Tensor:
    """Softmax attention probabilities ``[B, H, Nq, Nk]`` in float32, as eager attention computes them."""
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    bias = additive_mask(attention_mask, query, key, causal)
    if bias is not None:
        logits = logits + bias
    return logits.softmax(dim=-1)


def _repeat_kv(states: Tensor, module) -> Tensor:
    """Grouped-query attention: repeat each key/value head for the query heads that share it."""
    groups = getattr(module, "num_key_value_groups", 1)
    return states if groups == 1 else states.repeat_interleave(groups, dim=1)


def policy_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    policy: Tensor,
    scaling: float | None,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """DynamicViT's softmax with policy: each query sees kept keys and itself, renormalised.

    The max is taken over the keys a query can see, and a dropped key's logit is capped at that max:
    the forward value is unchanged (dropped keys are multiplied by 0), but the straight-through gradient
    towards keeping a dropped key stays bounded. With the max over all keys (DynamicViT's code), a
    dropped key far above every kept one makes that gradient explode (~1/eps).
    """
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if attention_mask is not None:
        logits = logits + attention_mask.float()
    n = policy.shape[1]
    eye = torch.eye(n, device=policy.device, dtype=torch.float32)
    keep = policy.float()[:, None, None, :]
    keep = keep + (1.0 - keep) * eye  # a dropped token still attends to itself, so its row stays finite
    visible_max = logits.masked_fill(keep.detach() <= 0, float("-inf")).amax(dim=-1, keepdim=True).detach()
    weights = (torch.minimum(logits, visible_max) - visible_max).exp() * keep
    probs = (weights + eps / n) / (weights.sum(dim=-1, keepdim=True) + eps)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous(), probs


def policy_bias(policy: Tensor) -> Tensor:
    """``[B, N]`` float32 additive key bias ``log p`` of a keep policy (1 kept, 0 dropped, soft in between): a
    dropped key is blocked as the model's own masks block (the dtype's minimum, never ``-inf``), so a hard 0/1
    policy computes exactly what gather mode computes. A soft policy's gradient is exact; at ``p = 0`` there is
    none (see ``needs_policy_attention``)."""
    blocked = torch.finfo(torch.float32).min
    policy = policy.float()
    return torch.where(policy > 0, policy.clamp_min(1e-30).log(), torch.full_like(policy, blocked))


def needs_policy_attention(policy: Tensor) -> bool:
    """A straight-through hard policy (zeros that carry a gradient) needs DynamicViT's policy attention: a ``log p``
    bias would block the dropped keys with no gradient towards keeping them. Soft or gradient-free policies take
    the bias, in whatever kernel the model uses."""
    return policy.requires_grad and bool((policy == 0).any())


def masked_with_policy(attention_mask: Tensor | None, query: Tensor, key: Tensor, bias: Tensor, causal: bool) -> Tensor:
    """The model's mask (bool, additive or none) plus a per-key ``bias`` ``[B, Nk]``, as one additive mask in the
    query's dtype; each query's own key (lower-right aligned diagonal) gets no bias, so a dropped token still
    attends to itself and no row is blocked by the policy alone."""
    base = additive_mask(attention_mask, query, key, causal)
    q_len, k_len = query.shape[-2], key.shape[-2]
    if bias.shape[-1] != k_len:
        raise ValueError(f"policy_bias covers {bias.shape[-1]} keys but the attention call has {k_len}")
    rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)
    own = rows == torch.arange(k_len, device=query.device)[None, :]
    keyed = bias.float()[:, None, None, :].masked_fill(own, 0.0)
    return (keyed if base is None else base + keyed).to(query.dtype)


def _eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' standard ``eager_attention_forward``, op for op (logits in the input dtype, softmax in float32):
    the fallback for an attention module whose modeling file's own eager function cannot be found."""
    key, value = _repeat_kv(key, module), _repeat_kv(value, module)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


_MODEL_EAGER: dict[type, Callable] = {}


def model_eager(module) -> Callable:
    """The eager attention function ``module``'s own modeling file passes as ``get_interface``'s fallback.

    Found by name among the globals that the attention class's ``forward`` reads (most models call it
    ``eager_attention_forward``; a few ``simple_`` / ``vision_`` / ``text_eager_attention_forward``), which also
    covers a subclass defined elsewhere that inherits ``forward``; else the module-level ``eager_attention_forward``
    of the class's file; else transformers' standard one, re-implemented (``_eager``).
    """
    cls = type(module)
    if cls not in _MODEL_EAGER:
        _MODEL_EAGER[cls] = _find_model_eager(cls)
    return _MODEL_EAGER[cls]


def _find_model_eager(cls: type) -> Callable:
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))
    code, scope = getattr(forward, "__code__", None), getattr(forward, "__globals__", {})
    if code is not None:
        found = {scope[n] for n in code.co_names if n.endswith("eager_attention_forward") and callable(scope.get(n))}
        if len(found) == 1:
            return found.pop()
    fallback = getattr(sys.modules.get(cls.__module__), "eager_attention_forward", None)
    return fallback if callable(fallback) else _eager


CALL_ATTRIBUTE = "tokensift_call"
SEGMENT_KERNELS = ("sdpa", "flex")


@dataclass
class Segments:
    """Block-diagonal attention over packed rows read end to end (slot ``row * length + column``): ``spans``
    ``[(start, end), ...]`` of every segment there, ``segment`` ``[rows, length]`` the segment id of each slot (-1
    padding), ``kernel`` one of ``SEGMENT_KERNELS``."""

    spans: list[tuple[int, int]]
    segment: Tensor
    kernel: str = "sdpa"


def _end_to_end(states: Tensor) -> Tensor:
    """``[rows, heads, length, d]`` as one sequence ``[1, heads, rows * length, d]``."""
    rows, heads, length, dim = states.shape
    return states.transpose(0, 1).reshape(1, heads, rows * length, dim)


def segment_attention(module, query, key, value, segments: Segments, key_bias, fn, scaling, dropout, **kwargs):
    """Attention of packed rows, each query seeing only the keys of its own segment (padding slots are never read).
    ``key_bias`` ``[rows, length]`` or None is added to each key's logits. Returns ``[rows, length, heads, d]``."""
    rows, heads, length, _ = query.shape
    query, key, value = _end_to_end(query), _end_to_end(key), _end_to_end(value)
    bias = None if key_bias is None else key_bias.reshape(1, rows * length).to(query.dtype)
    if segments.kernel == "flex":
        out = _flex_segments(query, key, value, segments.segment.reshape(1, rows * length), bias, scaling)
        return out.view(rows, length, heads, -1), None
    out = query.new_zeros(1, rows * length, heads, value.shape[-1])
    for start, end in segments.spans:
        piece, _ = fn(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None if bias is None else bias[:, None, None, start:end],
            scaling=scaling,
            dropout=dropout,
            **kwargs,
        )
        out[:, start:end] = piece
    return out.view(rows, length, heads, -1), None


_FLEX: dict[str, Callable] = {}


def _flex_segments(query, key, value, segment: Tensor, bias: Tensor | None, scaling):
    """One ``flex_attention`` call over the end-to-end sequence: a document mask by ``segment`` ``[1, L]`` (padding
    slots see padding slots) and the key bias as a ``score_mod``."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "attention" not in _FLEX:  # compiled once per process; the first call of each shape compiles (~26 s on CPU)
        _FLEX["attention"] = torch.compile(flex_attention, dynamic=False)
    length = segment.shape[1]

    def same_segment(b, h, q_index, kv_index):
        return segment[b, q_index] == segment[b, kv_index]

    block_mask = create_block_mask(same_segment, 1, None, length, length, device=query.device)
    score_mod = None
    if bias is not None:

        def score_mod(score, b, h, q_index, kv_index):
            return score + bias[b, kv_index]

    groups = query.shape[1] != key.shape[1]
    out = _FLEX["attention"](
        query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scaling, enable_gqa=groups
    )
    return out.transpose(1, 2).contiguous()


def _make(base: str):
    def tokensift_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        call = getattr(module, CALL_ATTRIBUTE, None) or {}
        if call.get("chunks") is not None:  # a packed sequence attended chunk by chunk: this call's own entry
            call = next(call["chunks"], None)
            if call is None:
                raise RuntimeError("the attention module was called more times than it was given chunk entries for")
        policy, capture, key_bias = call.get("policy"), call.get("capture"), call.get("key_bias")
        if call.get("segments") is not None:
            if attention_mask is not None:  # the rows are ours: a mask the model built for its own layout is stale
                raise ValueError(
                    "packed rows (segments) reached an attention call that carries the model's own mask; the "
                    "frame-batched tower driver supports towers that attend without one (Molmo2)."
                )
            fn = model_eager(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
            return segment_attention(
                module, query, key, value, call["segments"], key_bias, fn, scaling, dropout, **kwargs
            )
        if call.get("policy_bias") is not None:
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
            attention_mask = masked_with_policy(attention_mask, query, key, call["policy_bias"], causal)
        if key_bias is not None:
            bias = key_bias.to(query.dtype)[:, None, None, :]
            attention_mask = bias if attention_mask is None else attention_mask + bias
        if capture is not None:
            capture["keys"] = key.float().mean(dim=1)  # [B, N, Dk]
            if call.get("capture_values"):
                capture["values"] = value.float()  # [B, Hkv, N, Dh], per key/value head
        if policy is not None:
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
            key, value = _repeat_kv(key, module), _repeat_kv(value, module)
            attention_mask = additive_mask(attention_mask, query, key, causal)
            out, probs = policy_attention(query, key, value, attention_mask, policy, scaling)
            if capture is not None:
                capture["attention"] = probs.detach()
            return out, probs
        if capture is not None:
            # the probabilities are computed on the side: the layer's output still comes from the model's own
            # kernel, so scoring a layer never changes what it computes
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
            probs = attention_probs(query, _repeat_kv(key, module), attention_mask, scaling, causal)
            capture["attention"] = probs.detach()
        fn = model_eager(module) if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        return fn(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    tokensift_attention.__name__ = f"tokensift_attention_{base}"
    return tokensift_attention


def wrapped_name(base: str) -> str:
    """Register (once) and return the name of the attention function wrapping ``base``."""
    if base.startswith(PREFIX):
        return base
    name = PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        if base != "eager" and base not in ALL_ATTENTION_FUNCTIONS:
            raise ValueError(
                f"attn_implementation {base!r} is not registered with transformers; "
                "use 'sdpa', 'eager' or a registered kernel."
            )
        AttentionInterface.register(name, _make(base))
        if base in ALL_MASK_ATTENTION_FUNCTIONS:
            # decoders build their causal/padding mask by the attention name; without this they would build none
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def base_name(name: str) -> str:
    return name[len(PREFIX) :] if name.startswith(PREFIX) else name
