"""An analytic FLOPs model of a (pruned) vision transformer forward pass.

One multiply-add counts as 2 FLOPs. Per transformer block with ``n`` tokens, hidden size ``d`` and MLP
width ``m``:

- attention projections q, k, v, o: ``4 · n · d²`` multiply-adds → ``8 n d²``
- attention scores ``QKᵀ`` and the weighted sum ``AV``: ``2 · n² · d`` multiply-adds → ``4 n² d``
- MLP (two linears): ``2 · n · d · m`` multiply-adds → ``4 n d m``

LayerNorms, softmax, GELU, residual adds and biases are left out (they are O(n·d) and do not change the
picture). The patch embedding (``2 · P · C · p² · d`` for ``P`` patches of ``p × p × C`` pixels) and the
classifier head (``2 · in · out`` per ``nn.Linear`` of ``model.classifier``, applied once to the pooled
vector) are counted once: pruning does not change them, but they belong to the total the ratio is taken of.

Token counts: every block before the first site sees all ``num_prefix + P`` tokens; a site ``vit.i``
(output of block ``i``) keeps ``count`` prunable tokens, so every block after it sees ``count +
num_prefix`` tokens (ToMe's merged tokens count once each).

The scorer's own cost is added at each site where it actually runs (a site whose budget keeps every
token that is still alive is skipped by the reduction hooks, so it costs nothing):

- learned scorers: every ``nn.Linear`` of the stage's predictor (``method.predictors[stage]``) costs
  ``2 · in · out`` per token present at the site; a learned method without ``predictors`` is charged
  all of its ``nn.Linear`` layers at every site.
- training-free scorers, with ``n`` tokens present at the site, hidden size ``d``, ``k`` tokens kept:
  ``l2norm`` ``n·d`` (squares and sums), ``divprune`` ``n²·d + k·n`` (cosine similarity matrix, then
  ``k`` greedy max-min sweeps), ``tome`` ``n²/4 · d`` (similarity between the two halves of the
  bipartite split, per merge round), ``cls_attention`` 0 (the attention probabilities it reads are
  those of the block itself, computed eagerly at that one layer instead of by SDPA: no extra work),
  ``random`` and the benchmark's ``oracle`` 0. A method may override this with a method
  ``analytic_flops(n, d, k) -> float``; any other training-free method is charged 0.

Multimodal LLMs (:func:`mllm_prefill_flops`): the prefill of the language model, sample by sample. A
decoder layer on ``n`` tokens costs ``n`` times the FLOPs per token of every ``nn.Linear`` in its attention
and MLP (read from the modules, so grouped-query attention and gated MLPs count what they compute) plus
``4 n² w`` for scores and weighted sum, ``w`` = heads × head size; the causal mask is not discounted, as
above. Sample ``b`` enters layer ``l`` with its text tokens and ``visual_per_layer[b, l]`` visual tokens
(``MLLMPruningHandle.visual_tokens_per_layer``; a DyVTE exit at ``llm.<k>`` means all of them before layer
``k``, none from ``k`` on: :func:`exit_visual_per_layer`). The vision tower, projector, embeddings and LM
head are left out: pruning inside the LLM does not change them, and the ratio is the LLM's. A method with
``analytic_mllm_flops(num_text, visual_per_layer) -> [B]`` is charged that (DyVTE: one router call per
layer until the sample exits); training-free MLLM methods read signals the model computes anyway, 0.

The MLLM bench's ratio adds the vision side (:func:`mllm_vision_flops`, one image: the patch embedding,
every tower block on all of the image's tower tokens, the projector / merger per LLM token) to both sides,
since the methods benched prune only inside or after it: ``(vision + LLM + scorer) / (vision + unpruned LLM)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from tokensift.backbones.vision import VisionAdapter

# cost of one selection at a site: (tokens present n, hidden d, prunable tokens kept k) -> FLOPs
TRAINING_FREE_COSTS: dict[str, Callable[[int, int, int], float]] = {
    "l2norm": lambda n, d, k: float(n * d),
    "divprune": lambda n, d, k: float(n * n * d + k * n),
    "tome": lambda n, d, k: n * n / 4 * d,
    "cls_attention": lambda n, d, k: 0.0,
    "random": lambda n, d, k: 0.0,
    "oracle": lambda n, d, k: 0.0,
}


def layer_flops(n, linear_per_token: float, attention_width: int):
    """One transformer layer on ``n`` tokens: its linears per token, plus ``QKᵀ`` and ``AV`` over width ``w``."""
    return n * linear_per_token + 4 * n * n * attention_width


def block_flops(n: int, d: int, m: int) -> float:
    """FLOPs of one transformer block on ``n`` tokens (hidden ``d``, MLP width ``m``)."""
    return float(layer_flops(n, 8 * d * d + 4 * d * m, d))


def _mlp_width(adapter: VisionAdapter) -> int:
    width = getattr(adapter.config, "intermediate_size", None)
    return int(width) if width is not None else 4 * adapter.hidden_size


def _linear_flops(module: nn.Module) -> float:
    """FLOPs per input vector of every ``nn.Linear`` inside ``module``: ``2 · in · out`` each."""
    return float(sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)))


def embed_flops(adapter: VisionAdapter, num_patches: int | None = None) -> float:
    """Patch embedding: a ``p × p`` convolution over ``C`` channels to ``d`` features, once per patch."""
    patches = adapter.num_patches() if num_patches is None else num_patches
    channels = int(getattr(adapter.config, "num_channels", 3))
    return float(2 * patches * channels * adapter.patch_size**2 * adapter.hidden_size)


def head_flops(adapter: VisionAdapter) -> float:
    """The classifier's linear layers on the pooled vector (0 for a bare tower without a classifier)."""
    classifier = getattr(adapter.model, "classifier", None)
    return _linear_flops(classifier) if isinstance(classifier, nn.Module) else 0.0


def tokens_per_layer(
    adapter: VisionAdapter, site_counts: Mapping[str, int] | None = None, num_patches: int | None = None
) -> list[int]:
    """Tokens entering each block: all of them up to the first site, ``count + num_prefix`` after a site."""
    patches = adapter.num_patches() if num_patches is None else num_patches
    counts = dict(site_counts or {})
    by_layer = {adapter.layer_of(site): count for site, count in counts.items()}
    current = adapter.num_prefix + patches
    out = []
    for index in range(adapter.num_layers):
        out.append(current)
        if index in by_layer:
            current = min(current, adapter.num_prefix + int(by_layer[index]))
    return out


def backbone_flops(adapter: VisionAdapter, tokens_per_layer: list[int], num_patches: int | None = None) -> float:
    """Patch embedding + every block at its token count + the classifier head."""
    if len(tokens_per_layer) != adapter.num_layers:
        raise ValueError(
            f"tokens_per_layer has {len(tokens_per_layer)} entries; this backbone has {adapter.num_layers} blocks."
        )
    d, m = adapter.hidden_size, _mlp_width(adapter)
    blocks = sum(block_flops(n, d, m) for n in tokens_per_layer)
    return embed_flops(adapter, num_patches) + blocks + head_flops(adapter)


def scorer_flops(
    adapter: VisionAdapter,
    method: nn.Module | None,
    site_counts: Mapping[str, int],
    num_patches: int | None = None,
) -> float:
    """The method's own cost, summed over the sites where it runs (see the module docstring)."""
    if method is None or not site_counts:
        return 0.0
    patches = adapter.num_patches() if num_patches is None else num_patches
    tokens = tokens_per_layer(adapter, site_counts, patches)
    d = adapter.hidden_size
    kind = getattr(method, "kind", "training-free")
    config_sites = list(getattr(getattr(method, "config", None), "sites", None) or [])
    predictors = getattr(method, "predictors", None)
    total, alive = 0.0, patches
    for site in sorted(site_counts, key=adapter.layer_of):
        count = int(site_counts[site])
        if count >= alive:  # the hooks skip a site with nothing to remove
            continue
        n = tokens[adapter.layer_of(site)]  # a block's output has as many tokens as its input
        custom = getattr(method, "analytic_flops", None)
        if callable(custom):
            total += float(custom(n, d, count))
        elif kind == "learned":
            if isinstance(predictors, nn.ModuleList) and site in config_sites and len(predictors) == len(config_sites):
                total += n * _linear_flops(predictors[config_sites.index(site)])
            else:
                total += n * _linear_flops(method)
        else:
            cost = TRAINING_FREE_COSTS.get(getattr(method, "name", ""))
            total += cost(n, d, count) if cost is not None else 0.0
        alive = count
    return total


def unpruned_flops(adapter: VisionAdapter, num_patches: int | None = None) -> float:
    patches = adapter.num_patches() if num_patches is None else num_patches
    return backbone_flops(adapter, tokens_per_layer(adapter, None, patches), patches)


def pruned_flops(
    adapter: VisionAdapter,
    handle_or_site_counts: Any = None,
    method: nn.Module | None = None,
    num_patches: int | None = None,
) -> dict[str, Any]:
    """FLOPs of a pruned forward pass.

    ``handle_or_site_counts`` is a ``PruningHandle`` (its current budget and method are used), a mapping
    ``site -> prunable tokens kept after it`` (pass ``method`` to charge its scorer), or ``None``
    (unpruned). Returns ``backbone``, ``scorer``, ``total`` (FLOPs), ``unpruned`` (FLOPs of the same
    model without pruning), ``ratio`` (``total / unpruned``) and ``tokens_per_layer``.
    """
    patches = adapter.num_patches() if num_patches is None else num_patches
    if handle_or_site_counts is None:
        counts: dict[str, int] = {}
    elif isinstance(handle_or_site_counts, Mapping):
        counts = {str(k): int(v) for k, v in handle_or_site_counts.items()}
    elif hasattr(handle_or_site_counts, "site_counts"):
        counts = dict(handle_or_site_counts.site_counts(patches))
        method = handle_or_site_counts.method if method is None else method
    else:
        raise TypeError(
            "pruned_flops takes a PruningHandle, a {site: kept count} mapping or None, "
            f"got {type(handle_or_site_counts).__name__}"
        )
    tokens = tokens_per_layer(adapter, counts, patches)
    backbone = backbone_flops(adapter, tokens, patches)
    scorer = scorer_flops(adapter, method, counts, patches)
    unpruned = unpruned_flops(adapter, patches)
    total = backbone + scorer
    return {
        "backbone": backbone,
        "scorer": scorer,
        "total": total,
        "unpruned": unpruned,
        "ratio": total / unpruned,
        "tokens_per_layer": tokens,
    }


def decoder_layer_shapes(adapter) -> list[tuple[float, int]]:
    """Per decoder layer of a multimodal LLM: (FLOPs of its linears per token, attention width heads × head size)."""
    out = []
    for layer in adapter.layers:
        attention = layer.self_attn
        heads = int(getattr(attention, "num_heads", 0) or adapter.text_config.num_attention_heads)
        head_dim = int(getattr(attention, "head_dim", 0) or adapter.hidden_size // heads)
        out.append((_linear_flops(attention) + _linear_flops(layer.mlp), heads * head_dim))
    return out


def exit_visual_per_layer(num_visual: Tensor, exit_layers: Tensor, num_layers: int) -> Tensor:
    """``[B, num_layers]`` visual tokens entering each layer when sample ``b``'s all leave at ``exit_layers[b]``.

    ``exit_layers[b] = k``: layers ``0 .. k-1`` see all ``num_visual[b]``, layers ``k ..`` none;
    ``num_layers`` (or more) keeps them to the end.
    """
    layers = torch.arange(num_layers, device=exit_layers.device)
    return torch.where(layers.unsqueeze(0) < exit_layers.unsqueeze(1), num_visual.unsqueeze(1), 0)


def mllm_prefill_flops(
    adapter,
    num_text: Tensor,
    visual_per_layer: Tensor,
    method: nn.Module | None = None,
    num_visual: Tensor | None = None,
) -> dict[str, Any]:
    """Analytic FLOPs of a multimodal LLM's prefill with per-sample visual token counts per decoder layer.

    Args:
        adapter: the model's ``MLLMAdapter`` (``tokensift.backbones.adapt(model)``).
        num_text: ``[B]`` text and special tokens of each sample (never pruned).
        visual_per_layer: ``[B, num_layers]`` visual tokens entering each decoder layer, per sample.
        method: charged its ``analytic_mllm_flops(num_text, visual_per_layer)`` when it has one.
        num_visual: ``[B]`` visual tokens of the unpruned input (default: ``visual_per_layer[:, 0]``, right
            unless something was pruned before the LLM).

    Returns ``llm`` (decoder layers), ``scorer``, ``total`` and ``unpruned`` FLOPs summed over the batch,
    ``ratio`` (``total / unpruned``) and ``per_sample_ratio`` (``[B]``).
    """
    num_text = torch.as_tensor(num_text).long().cpu()
    visual = torch.as_tensor(visual_per_layer).long().cpu()
    num_layers = adapter.num_layers
    if visual.dim() != 2 or visual.shape[1] != num_layers or num_text.shape != visual.shape[:1]:
        raise ValueError(
            f"visual_per_layer must be [B, {num_layers}] (one count per sample and decoder layer) with num_text "
            f"[B]; got {tuple(visual.shape)} and {tuple(num_text.shape)}."
        )
    if bool((visual[:, 1:] > visual[:, :-1]).any()):
        raise ValueError("visual_per_layer must not grow with depth: pruned tokens do not come back.")
    num_visual = visual[:, 0] if num_visual is None else torch.as_tensor(num_visual).long().cpu()
    shapes = decoder_layer_shapes(adapter)
    tokens = (num_text.unsqueeze(1) + visual).double()
    full = (num_text + num_visual).double().unsqueeze(1).expand_as(tokens)
    llm = torch.zeros(len(num_text), dtype=torch.float64)
    unpruned = torch.zeros_like(llm)
    for index, (linear, width) in enumerate(shapes):
        llm += layer_flops(tokens[:, index], linear, width)
        unpruned += layer_flops(full[:, index], linear, width)
    custom = getattr(method, "analytic_mllm_flops", None)
    scorer = (
        torch.as_tensor(custom(num_text, visual), dtype=torch.float64) if callable(custom) else torch.zeros_like(llm)
    )
    total = llm + scorer
    return {
        "llm": float(llm.sum()),
        "scorer": float(scorer.sum()),
        "total": float(total.sum()),
        "unpruned": float(unpruned.sum()),
        "ratio": float(total.sum() / unpruned.sum()),
        "per_sample_ratio": total / unpruned,
    }


def mllm_vision_flops(adapter, visual_tokens: int) -> float:
    """FLOPs of one image through the vision tower and projector, giving ``visual_tokens`` LLM tokens.

    LLaVA: the CLIP tower runs on ``(image_size / patch_size)²`` patches plus its [CLS] (SigLIP: none), and the
    projector on every feature the LLM receives. Qwen2-VL: the tower runs on ``visual_tokens × merge²`` patches
    (attention within the image) and the merger on each group of ``merge²`` of them. Per block: its linears per
    token (read from the modules) plus ``4 n² w``, ``w`` the tower width; the patch embedding is ``2 ·
    weights`` of its convolution per patch. Norms and activations are left out, as everywhere here.
    """
    model, family = adapter.model, adapter.family
    vision = model.config.vision_config
    tower = family.tower(model)
    if family.name == "qwen2_vl":
        patches = int(visual_tokens) * int(vision.spatial_merge_size) ** 2
        tower_tokens, width = patches, int(vision.embed_dim)
    else:
        patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
        has_cls = hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding")
        tower_tokens, width = patches + int(has_cls), int(vision.hidden_size)
    convolution = next(m for m in tower.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    embed = 2.0 * convolution.weight.numel() * patches
    blocks = sum(layer_flops(tower_tokens, _linear_flops(block), width) for block in adapter.tower_blocks)
    merger = tower.merger if family.name == "qwen2_vl" else family.projector(model)  # Qwen2-VL merges in the tower
    projector = int(visual_tokens) * _linear_flops(merger)
    return float(embed + blocks + projector)


def last_prefill_flops(handle) -> dict[str, Any]:
    """:func:`mllm_prefill_flops` of an ``MLLMPruningHandle``'s last prefill (its method charged)."""
    visual = handle.visual_tokens_per_layer
    if visual is None:
        raise ValueError("the handle has run no prefill with visual tokens yet: run the model (or generate) first.")
    return mllm_prefill_flops(handle.adapter, handle.last_num_text, visual, handle.method, handle.last_num_visual)


__all__ = [
    "TRAINING_FREE_COSTS",
    "backbone_flops",
    "block_flops",
    "decoder_layer_shapes",
    "embed_flops",
    "exit_visual_per_layer",
    "head_flops",
    "last_prefill_flops",
    "layer_flops",
    "mllm_prefill_flops",
    "mllm_vision_flops",
    "pruned_flops",
    "scorer_flops",
    "tokens_per_layer",
    "unpruned_flops",
]
