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

**The method's own cost** (``scorer``) is charged at each site where it runs (a site whose budget keeps
every token still alive is skipped by the reduction hooks, so it costs nothing), per image (vision) or per
sample (multimodal LLM), described by a :class:`SiteShape` (``n`` tokens present, ``v`` of them prunable,
``k`` kept, hidden ``d``, the read attention's ``H`` heads of size ``h``). It has two parts, both in
:func:`site_flops`:

1. What the pruning handle computes for the method, by the capability the method declares
   (:func:`capture_flops`; the model's own forward still runs its kernel, so all of this is extra):

   - ``needs_attention`` (and ``needs_keys`` at a ``vit.<i>`` site, whose capture goes through the same
     attention wrapper, ``tokensift/attention.py``, which computes the probabilities whenever it captures):
     the attention map of the read layer (the site block; the decoder layer ``k-1`` for ``llm.<k>``) on the
     side, every row: ``QKᵀ`` ``2 n² H h``, then per score a scale, the mask add (decoders only: the causal
     mask) and a softmax (max, subtract, exp, sum, divide: 5), i.e. ``(6 + causal) · H n²``; and the
     head-averaged keys the capture stores, ``n · H_kv h``. ``needs_values`` (``vit.<i>``) goes through the same
     capture (the map and keys as above); the values themselves are the ones the block computed: 0.
   - ``needs_keys`` at an ``llm.<k>`` site: a hook on ``k_proj`` keeps the output it computed anyway: 0.
   - ``needs_query_attention`` (``llm.<k>``, PyramidDrop): the last text token's attention row in layer ``k``
     itself, computed by the handle: the layer's input RMSNorm on the ``n`` tokens ``4 n d``, their keys
     ``2 n d · H_kv h``, one query ``2 d · H h``, RoPE on both (3 per element), the row's logits ``2 n H h``
     and scale, causal mask and softmax ``7 H n``.
   - ``needs_final_norm`` (``llm.<k>``, DART): the LM's final RMSNorm on the ``n`` hidden states, ``4 n d``.
   - ``needs_tower_attention`` (``pre_llm``): per image, the scored tower block's map on its ``t`` tower
     tokens (``2 t² H_t h_t + 6 H_t t²``, no mask), its averaged keys ``t · H_t h_t`` and the family's
     head sum ``H_t t²`` that turns it into one score per token.

2. The method's own algorithm: its ``analytic_flops(site: SiteShape) -> float`` (each method's
   ``model.py`` next to its code; the formulas are in their docstrings). A learned method without one is
   charged every ``nn.Linear`` of the stage's predictor (``method.predictors[stage]``), ``2 · in · out`` per
   token present (all of its ``nn.Linear`` layers when it has no ``predictors``); a training-free method
   without one (``random``, the benchmark's ``oracle``) costs 0.

The primitives the formulas share are static methods of :class:`SiteShape`: a matrix product ``2 m k n``,
normalising ``m`` rows of width ``w`` (square, sum, divide: ``3 m w``), the attention map above. As in
the backbone count, work per scalar (sorting, top-k, comparisons, masks, index arithmetic, O(n) loops) is
left out; passes over ``n × d`` features and ``H × n × n`` maps are not.

Multimodal LLMs (:func:`mllm_prefill_flops`): the prefill of the language model, sample by sample. A
decoder layer on ``n`` tokens costs ``n`` times the FLOPs per token of every ``nn.Linear`` in its attention
and MLP (read from the modules, so grouped-query attention and gated MLPs count what they compute) plus
``4 n² w`` for scores and weighted sum, ``w`` = heads × head size; the causal mask is not discounted, as
above. Sample ``b`` enters layer ``l`` with its text tokens and ``visual_per_layer[b, l]`` visual tokens
(``MLLMPruningHandle.visual_tokens_per_layer``; a DyVTE exit at ``llm.<k>`` means all of them before layer
``k``, none from ``k`` on: :func:`exit_visual_per_layer`). The vision tower, projector, embeddings and LM
head are left out: pruning inside the LLM does not change them, and the ratio is the LLM's. The method is
charged as above at each of its ``pre_llm`` / ``llm.<k>`` sites (its configured or default sites, or
``sites``) that runs: one where some sample of the batch drops a visual token, or every site of a method
that ``decides_exits``; then every sample of the batch pays it, with its own token counts (``n`` = its
text + the visual tokens entering the site, ``v`` = those visual tokens, ``k`` = those entering the next
layer; ``pre_llm``: the LLM's input). Tower tokens are counted as in :func:`mllm_vision_flops` (one tower
image per LLaVA image, one Qwen2-VL image per sample).

The MLLM bench's ratio adds the vision side as the tower ran it (:class:`TowerFlopsCounter`: the patch
embedding, every tower block on the tokens it received, attention per frame / image segment, the projector /
merger per output token; :func:`mllm_vision_flops` is the same count for one unpruned image):
``(vision + LLM + scorer) / (unpruned vision + unpruned LLM)``, so ``vit.<i>`` sites (STTS) are charged what they
save inside the tower.

Layer skipping (``das``, :mod:`tokensift.skip`): a skipped block's FLOPs leave the total and its replacement's (the
method's ``replacement_flops``: an adapter's two projections) are charged as ``scorer``; every token still runs through
every other block (:func:`vit_skip_flops`, :func:`mllm_skip_prefill_flops`; :func:`skipped_blocks_flops` the sum).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tokensift.attention import CALL_ATTRIBUTE
from tokensift.backbones.vision import VisionAdapter

SOFTMAX_PER_SCORE = 5  # max, subtract, exp, sum, divide
RMS_NORM_PER_ELEMENT = 4  # square, mean, scale by the reciprocal root, weight
ROPE_PER_ELEMENT = 3  # x · cos + rotate(x) · sin


@dataclass(frozen=True)
class SiteShape:
    """What a method works on at one site, for one image (vision) or one sample (multimodal LLM).

    ``tokens`` (``n``): tokens present at the site, [CLS] / text included; ``prunable`` (``v``): the patch /
    visual tokens among them; ``keep`` (``k``): those of them kept; ``hidden`` (``d``): width of the hidden
    states; ``heads`` / ``head_dim`` / ``kv_heads``: the attention the site reads (the site block; decoder
    layer ``k-1`` for ``llm.<k>``); ``causal``: that attention is masked (a decoder). ``tower_*``: per image,
    the scored vision-tower block (``pre_llm`` sites of a multimodal LLM), ``tower_images`` images.
    """

    site: str
    tokens: int
    prunable: int
    keep: int
    hidden: int
    heads: int
    head_dim: int
    kv_heads: int
    causal: bool = False
    tower_tokens: int = 0
    tower_images: int = 0
    tower_heads: int = 0
    tower_head_dim: int = 0

    @property
    def protected(self) -> int:
        """[CLS] / text tokens present (never pruned)."""
        return self.tokens - self.prunable

    @property
    def width(self) -> int:
        """Query width ``H h``."""
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @staticmethod
    def matmul(m: int, k: int, n: int) -> float:
        """``[m, k] @ [k, n]``: ``2 m k n``."""
        return 2.0 * m * k * n

    @staticmethod
    def normalize(rows: int, width: int) -> float:
        """Dividing ``rows`` vectors of ``width`` by their L2 norm: square, sum, divide, ``3`` per element."""
        return 3.0 * rows * width

    @staticmethod
    def cosine_matrix(rows: int, width: int) -> float:
        """``tokensift.scorers.multimodal.cosine_similarity_matrix`` of ``rows`` vectors: normalise, then ``XXᵀ``."""
        return SiteShape.normalize(rows, width) + SiteShape.matmul(rows, width, rows)

    @staticmethod
    def attention_map(rows: int, keys: int, heads: int, head_dim: int, causal: bool = False) -> float:
        """Softmax attention probabilities of ``rows`` queries over ``keys`` keys, as ``attention_probs`` computes
        them: ``QKᵀ`` (``2 · rows · keys · heads · head_dim``), then per score a scale, the mask add when
        ``causal`` and a softmax (5)."""
        scores = heads * rows * keys
        return SiteShape.matmul(rows, heads * head_dim, keys) + (1 + int(causal) + SOFTMAX_PER_SCORE) * scores


def capture_flops(method: nn.Module, site: SiteShape) -> float:
    """What the pruning handle computes for ``method`` at ``site`` besides the model's forward (module docstring, 1)."""
    kind = site.site.split(".")[0]
    n = site.tokens
    reads_map = bool(getattr(method, "needs_attention", False)) and kind in ("vit", "llm")
    # a vit.<i> capture of keys or values goes through the attention wrapper, which computes the map when it captures
    captures = bool(getattr(method, "needs_keys", False)) or bool(getattr(method, "needs_values", False))
    reads_map = reads_map or (kind == "vit" and captures)
    total = 0.0
    if reads_map:
        total += site.attention_map(n, n, site.heads, site.head_dim, site.causal) + n * site.kv_width
    if kind == "llm" and bool(getattr(method, "needs_query_attention", False)):
        # layer k's input norm on every token, its keys, the last text token's query, RoPE on both, one score row
        rope = ROPE_PER_ELEMENT * (n * site.kv_width + site.width)
        keys_and_query = site.matmul(n, site.hidden, site.kv_width) + site.matmul(1, site.hidden, site.width)
        total += RMS_NORM_PER_ELEMENT * n * site.hidden + keys_and_query + rope
        total += site.attention_map(1, n, site.heads, site.head_dim, causal=True)
    if kind == "llm" and bool(getattr(method, "needs_keys", False)):
        # the keys come from k_proj (already computed); the handle rotates them as layer k-1's attention does
        total += ROPE_PER_ELEMENT * n * site.kv_width
    if kind == "llm" and bool(getattr(method, "needs_final_norm", False)):
        total += RMS_NORM_PER_ELEMENT * n * site.hidden
    if kind == "pre_llm" and bool(getattr(method, "needs_tower_attention", False)):
        t, heads, head_dim = site.tower_tokens, site.tower_heads, site.tower_head_dim
        per_image = site.attention_map(t, t, heads, head_dim) + t * heads * head_dim + heads * t * t
        total += site.tower_images * per_image
    return total


def _learned_flops(method: nn.Module, site: SiteShape) -> float:
    """A learned scorer without its own formula: its stage's predictor linears (or all of its linears) per token."""
    config_sites = list(getattr(getattr(method, "config", None), "sites", None) or [])
    predictors = getattr(method, "predictors", None)
    if isinstance(predictors, nn.ModuleList) and site.site in config_sites and len(predictors) == len(config_sites):
        return site.tokens * _linear_flops(predictors[config_sites.index(site.site)])
    return site.tokens * _linear_flops(method)


def site_flops(method: nn.Module | None, site: SiteShape) -> float:
    """The method's whole cost at one site it runs at: the handle's capture plus its own algorithm."""
    if method is None:
        return 0.0
    own = getattr(method, "analytic_flops", None)
    if callable(own):
        algorithm = float(own(site))
    elif getattr(method, "kind", "training-free") == "learned":
        algorithm = _learned_flops(method, site)
    else:
        algorithm = 0.0
    return capture_flops(method, site) + algorithm


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


def vit_site_shape(adapter: VisionAdapter, site: str, tokens: int, prunable: int, keep: int) -> SiteShape:
    """The :class:`SiteShape` of ``vit.<i>``: the block's tokens, its hidden size and (unmasked) attention heads."""
    d = adapter.hidden_size
    heads = int(adapter.config.num_attention_heads)
    head_dim = int(getattr(adapter.config, "head_dim", 0) or d // heads)
    return SiteShape(site, tokens, prunable, keep, d, heads, head_dim, heads)


def scorer_flops(
    adapter: VisionAdapter,
    method: nn.Module | None,
    site_counts: Mapping[str, int],
    num_patches: int | None = None,
) -> float:
    """The method's own cost, summed over the sites where it runs (see the module docstring); a method that
    ``observes_every_block`` also pays it at every other block before its last site while more patches are alive
    than the last site keeps (the handle captures and calls ``observe`` there)."""
    if method is None or not site_counts:
        return 0.0
    patches = adapter.num_patches() if num_patches is None else num_patches
    tokens = tokens_per_layer(adapter, site_counts, patches)
    by_layer = {adapter.layer_of(site): int(count) for site, count in site_counts.items()}
    observes, final = bool(getattr(method, "observes_every_block", False)), min(by_layer.values())
    total, alive = 0.0, patches
    for index in range(max(by_layer) + 1):
        n = tokens[index]  # a block's output has as many tokens as its input
        count = by_layer.get(index)
        if count is not None and count < alive:  # the hooks skip a site with nothing to remove
            total += site_flops(method, vit_site_shape(adapter, f"vit.{index}", n, alive, count))
            alive = count
        elif observes and alive > final:
            total += site_flops(method, vit_site_shape(adapter, f"vit.{index}", n, alive, alive))
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


def decoder_layer_shapes(adapter, layers: Sequence[nn.Module] | None = None) -> list[tuple[float, int]]:
    """Per decoder layer of a multimodal LLM: (FLOPs of its linears per token, attention width heads × head size).

    ``layers``: the decoder layers to read (default ``adapter.layers``; a layer-skip handle's originals while some
    are swapped out)."""
    out = []
    for layer in adapter.layers if layers is None else layers:
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
    sites: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Analytic FLOPs of a multimodal LLM's prefill with per-sample visual token counts per decoder layer.

    Args:
        adapter: the model's ``MLLMAdapter`` (``tokensift.backbones.adapt(model)``).
        num_text: ``[B]`` text and special tokens of each sample (never pruned).
        visual_per_layer: ``[B, num_layers]`` visual tokens entering each decoder layer, per sample.
        method: charged at each of its ``pre_llm`` / ``llm.<k>`` sites that runs (:func:`site_flops`).
        num_visual: ``[B]`` visual tokens of the unpruned input (default: ``visual_per_layer[:, 0]``, right
            unless something was pruned before the LLM).
        sites: the method's sites (default: its configured or default sites, as ``ts.apply`` resolves them).

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
    scorer = _mllm_scorer_flops(adapter, method, sites, num_text, visual, num_visual)
    return _prefill_summary(llm, scorer, unpruned)


def _mllm_sites(adapter, method: nn.Module, sites: Sequence[str] | None) -> list:
    if sites is None:
        config = getattr(method, "config", None)
        sites = getattr(config, "sites", None) or method.default_sites(adapter)
    return sorted((adapter.parse_site(name) for name in sites), key=lambda s: s.depth)


def _llm_attention(adapter, layer: int) -> tuple[int, int, int]:
    """(heads, head size, key/value heads) of decoder layer ``layer``'s attention."""
    attention, config = adapter.attention_modules[layer], adapter.text_config
    heads = int(getattr(attention, "num_heads", 0) or config.num_attention_heads)
    head_dim = int(getattr(attention, "head_dim", 0) or adapter.hidden_size // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    return heads, head_dim, kv_heads


def _tower_geometry(adapter, visual_tokens: int) -> dict[str, int]:
    """One image's tower: ``patches``, ``tokens`` ([CLS] included), ``width``, ``heads``; ``per_image`` LLM tokens."""
    model, family = adapter.model, adapter.family
    vision = model.config.vision_config
    if family.name == "molmo2":
        raise ValueError(
            "Molmo2's tower cost per sample depends on its crops / frames and the processor's pooling window (how many "
            "LLM tokens a crop gives), which its config does not hold; the analytic tower FLOPs (pre_llm sites, "
            "mllm_vision_flops) do not cover Molmo2 yet. llm.<k> sites' LLM FLOPs do."
        )
    if family.name == "qwen2_vl":
        patches = int(visual_tokens) * int(vision.spatial_merge_size) ** 2
        width, heads = int(vision.embed_dim), int(vision.num_heads)
        return {"patches": patches, "tokens": patches, "width": width, "heads": heads, "per_image": visual_tokens}
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    tower = family.tower(model)
    has_cls = int(hasattr(getattr(tower, "vision_model", tower).embeddings, "class_embedding"))
    full = getattr(model.config, "vision_feature_select_strategy", "default") == "full"
    return {
        "patches": patches,
        "tokens": patches + has_cls,
        "width": int(vision.hidden_size),
        "heads": int(vision.num_attention_heads),
        "per_image": patches + has_cls * int(full),
    }


def mllm_site_shape(adapter, site, num_text: int, visual: int, kept: int, num_visual: int) -> SiteShape:
    """The :class:`SiteShape` of one sample at a ``pre_llm`` / ``llm.<k>`` site (``site``: a parsed ``Site``).

    ``visual`` tokens reach the site and ``kept`` leave it; ``num_visual``: the sample's unpruned visual tokens
    (its tower images)."""
    heads, head_dim, kv_heads = _llm_attention(adapter, max(site.index - 1, 0))
    tower: dict[str, int] = {}
    if site.kind == "pre_llm" and num_visual > 0:
        geometry = _tower_geometry(adapter, num_visual)
        tower = {
            "tower_tokens": geometry["tokens"],
            "tower_images": max(1, num_visual // geometry["per_image"]),
            "tower_heads": geometry["heads"],
            "tower_head_dim": geometry["width"] // geometry["heads"],
        }
    return SiteShape(
        site.name, num_text + visual, visual, kept, adapter.hidden_size, heads, head_dim, kv_heads, True, **tower
    )


def _prefill_summary(llm: Tensor, scorer: Tensor, unpruned: Tensor) -> dict[str, Any]:
    """Per-sample LLM and scorer FLOPs ``[B]`` against the unpruned prefill: totals, the ratio, per-sample ratios."""
    total = llm + scorer
    return {
        "llm": float(llm.sum()),
        "scorer": float(scorer.sum()),
        "total": float(total.sum()),
        "unpruned": float(unpruned.sum()),
        "ratio": float(total.sum() / unpruned.sum()),
        "per_sample_ratio": total / unpruned,
    }


def _mllm_scorer_flops(adapter, method, sites, num_text: Tensor, visual: Tensor, num_visual: Tensor) -> Tensor:
    """``[B]``: the method at each of its multimodal sites that runs, every sample of the batch paying its own."""
    scorer = torch.zeros(len(num_text), dtype=torch.float64)
    if method is None:
        return scorer
    decides_exits = bool(getattr(method, "decides_exits", False))
    for site in _mllm_sites(adapter, method, sites):
        if site.kind == "vit":  # in the tower (whose blocks TowerFlopsCounter charges): the method on each
            vision = adapter.model.config.vision_config  # sample's groups, one per unpruned LLM token
            width = int(getattr(vision, "hidden_size", None) or vision.embed_dim)
            heads = int(getattr(vision, "num_attention_heads", None) or vision.num_heads)
            for b in range(len(num_text)):
                groups, kept = int(num_visual[b]), int(visual[b, 0])
                if groups == 0 or (kept == groups and not decides_exits):
                    continue
                shape = SiteShape(site.name, groups, groups, kept, width, heads, width // heads, heads)
                scorer[b] += site_flops(method, shape)
            continue
        before = num_visual if site.kind == "pre_llm" else visual[:, site.index - 1]
        after = visual[:, 0] if site.kind == "pre_llm" else visual[:, site.index]
        if not decides_exits and not bool((after < before).any()):  # the handle skips it
            continue
        for b in range(len(num_text)):
            shape = mllm_site_shape(adapter, site, int(num_text[b]), int(before[b]), int(after[b]), int(num_visual[b]))
            scorer[b] += site_flops(method, shape)
    return scorer


def mllm_vision_flops(adapter, visual_tokens: int) -> float:
    """FLOPs of one image through the vision tower and projector, giving ``visual_tokens`` LLM tokens.

    LLaVA: the CLIP tower runs on ``(image_size / patch_size)²`` patches plus its [CLS] (SigLIP: none), and the
    projector on every feature the LLM receives. Qwen2-VL: the tower runs on ``visual_tokens × merge²`` patches
    (attention within the image) and the merger on each group of ``merge²`` of them. Per block: its linears per
    token (read from the modules) plus ``4 n² w``, ``w`` the tower width; the patch embedding is ``2 ·
    weights`` of its convolution per patch. Norms and activations are left out, as everywhere here.
    """
    model, family = adapter.model, adapter.family
    tower = family.tower(model)
    geometry = _tower_geometry(adapter, visual_tokens)
    patches, tower_tokens, width = geometry["patches"], geometry["tokens"], geometry["width"]
    convolution = next(m for m in tower.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    embed = 2.0 * convolution.weight.numel() * patches
    blocks = sum(layer_flops(tower_tokens, _linear_flops(block), width) for block in adapter.tower_blocks)
    merger = tower.merger if family.name == "qwen2_vl" else family.projector(model)  # Qwen2-VL merges in the tower
    projector = int(visual_tokens) * _linear_flops(merger)
    return float(embed + blocks + projector)


class TowerFlopsCounter:
    """Analytic FLOPs of what a multimodal model's vision tower *ran*, read from each block's input as it ran.

    Inside ``with TowerFlopsCounter(adapter) as counter:`` every tower call adds up, per block, its linears on every
    slot the block received (padding slots of packed rows included: they are computed) plus ``4 n² w`` per attention
    segment: Qwen2-VL's ``cu_seqlens`` chunks, a packed tower's per-frame segments (``tokensift.attention.Segments``),
    otherwise one segment per row of the block's input (a CLIP / Molmo2 tower's images or frames). The patch embedding
    is ``2 · weights`` per patch it embeds, the projector (Molmo2's pooling adapter, Qwen2-VL's merger,
    LLaVA's projector) its linears per output token. So a ``vit.<i>`` site's savings, packing waste and all, are
    charged as computed. ``counter.calls`` holds one total per tower call (``generate`` calls the tower once)."""

    def __init__(self, adapter):
        self.adapter = adapter
        model, family = adapter.model, adapter.family
        self._tower, self._projector = family.tower(model), family.projector(model)
        self._blocks = list(family.tower_blocks(model))
        self._attention = [family.tower_attention(block) for block in self._blocks]
        self._linear = [_linear_flops(block) for block in self._blocks]
        self._embedding = next(
            m for m in self._tower.modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d))
        )  # the patch embedding comes first in every tower
        self._embed_per_patch = 2.0 * self._embedding.weight.numel()
        self._projector_per_token = _linear_flops(self._projector)
        self._hooks: list = []
        self.calls: list[float] = []

    def __enter__(self) -> TowerFlopsCounter:
        self.calls = []
        self._hooks = [
            self._tower.register_forward_pre_hook(self._start),
            self._embedding.register_forward_hook(self._embed),
        ]
        for index, block in enumerate(self._blocks):
            self._hooks.append(block.register_forward_pre_hook(self._block(index), with_kwargs=True))
        self._hooks.append(self._projector.register_forward_hook(self._project))
        return self

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def flops(self) -> float:
        """The first tower call's FLOPs (0 when the tower did not run)."""
        return self.calls[0] if self.calls else 0.0

    def _start(self, module, args) -> None:
        self.calls.append(0.0)

    def _block(self, index: int):
        width = None

        def hook(module, args, kwargs) -> None:
            nonlocal width
            hidden = args[0] if args else kwargs["hidden_states"]
            if width is None:
                width = int(hidden.shape[-1])
            slots = hidden.numel() // width
            entry = getattr(self._attention[index], CALL_ATTRIBUTE, None) or {}
            cu_seqlens = kwargs.get("cu_seqlens")
            if entry.get("segments") is not None:
                lengths = [end - start for start, end in entry["segments"].spans]
            elif cu_seqlens is not None:
                lengths = cu_seqlens.diff().tolist()
            else:
                rows = slots // int(hidden.shape[-2])
                lengths = [int(hidden.shape[-2])] * rows
            flops = slots * self._linear[index] + 4.0 * width * sum(n * n for n in lengths)
            if self.calls:
                self.calls[-1] += float(flops)

        return hook

    def _embed(self, module, args, output: Tensor) -> None:
        patches = output.numel() // output.shape[1 if isinstance(module, (nn.Conv2d, nn.Conv3d)) else -1]
        if self.calls:
            self.calls[-1] += float(patches) * self._embed_per_patch

    def _project(self, module, args, output) -> None:
        hidden = output if isinstance(output, Tensor) else output[0]
        if self.calls:
            self.calls[-1] += float(hidden.numel() // hidden.shape[-1]) * self._projector_per_token


def skipped_blocks_flops(
    block_flops_per_layer: Sequence[float], skipped: Sequence[int], replacement_flops: Mapping[int, float]
) -> dict[str, float]:
    """A stack of blocks with ``skipped`` ones replaced by small modules (layer skipping, ``das``): ``blocks``, the
    FLOPs of the blocks that still run; ``replacements``, those of the modules that run instead (``replacement_flops``
    per skipped layer); ``removed``, those of the skipped blocks."""
    gone = set(skipped)
    return {
        "blocks": float(sum(f for i, f in enumerate(block_flops_per_layer) if i not in gone)),
        "replacements": float(sum(replacement_flops[i] for i in gone)),
        "removed": float(sum(block_flops_per_layer[i] for i in gone)),
    }


def vit_skip_flops(adapter: VisionAdapter, handle, num_patches: int | None = None) -> dict[str, Any]:
    """:func:`pruned_flops`'s fields for a vision transformer under a ``LayerSkipHandle``: every token runs through
    every block that is not skipped; a skipped block's FLOPs are replaced by its adapter's (``scorer``)."""
    patches = adapter.num_patches() if num_patches is None else num_patches
    tokens = tokens_per_layer(adapter, None, patches)
    d, m = adapter.hidden_size, _mlp_width(adapter)
    skipped = handle.skipped_layers if handle.enabled else []
    method = handle.method
    stack = skipped_blocks_flops(
        [block_flops(n, d, m) for n in tokens], skipped, {i: method.replacement_flops(i, tokens[i]) for i in skipped}
    )
    backbone = embed_flops(adapter, patches) + stack["blocks"] + head_flops(adapter)
    unpruned = unpruned_flops(adapter, patches)
    total = backbone + stack["replacements"]
    return {
        "backbone": backbone,
        "scorer": stack["replacements"],
        "total": total,
        "unpruned": unpruned,
        "ratio": total / unpruned,
        "tokens_per_layer": tokens,
    }


def mllm_skip_prefill_flops(handle, num_text: Tensor, num_visual: Tensor) -> dict[str, Any]:
    """:func:`mllm_prefill_flops`'s fields for a multimodal LLM's prefill under a ``LayerSkipHandle``: sample ``b``'s
    ``num_text[b] + num_visual[b]`` tokens run through every decoder layer that is not skipped; a skipped layer costs
    its adapter on those tokens (``scorer``)."""
    adapter, method = handle.adapter, handle.method
    tokens = (torch.as_tensor(num_text).long().cpu() + torch.as_tensor(num_visual).long().cpu()).double()
    shapes = decoder_layer_shapes(adapter, [handle.original_layer(i) for i in range(adapter.num_layers)])
    skipped = handle.skipped_layers if handle.enabled else []
    llm = torch.zeros_like(tokens)
    unpruned = torch.zeros_like(tokens)
    scorer = torch.zeros_like(tokens)
    for index, (linear, width) in enumerate(shapes):
        cost = layer_flops(tokens, linear, width)
        unpruned += cost
        if index in skipped:
            scorer += torch.tensor([method.replacement_flops(index, int(n)) for n in tokens.tolist()])
        else:
            llm += cost
    return _prefill_summary(llm, scorer, unpruned)


def last_prefill_flops(handle) -> dict[str, Any]:
    """:func:`mllm_prefill_flops` of an ``MLLMPruningHandle``'s last prefill (its method charged)."""
    visual = handle.visual_tokens_per_layer
    if visual is None:
        raise ValueError("the handle has run no prefill with visual tokens yet: run the model (or generate) first.")
    return mllm_prefill_flops(
        handle.adapter, handle.last_num_text, visual, handle.method, handle.last_num_visual, handle.sites
    )


__all__ = [
    "SiteShape",
    "TowerFlopsCounter",
    "backbone_flops",
    "block_flops",
    "capture_flops",
    "decoder_layer_shapes",
    "embed_flops",
    "exit_visual_per_layer",
    "head_flops",
    "last_prefill_flops",
    "layer_flops",
    "mllm_prefill_flops",
    "mllm_site_shape",
    "mllm_skip_prefill_flops",
    "mllm_vision_flops",
    "pruned_flops",
    "scorer_flops",
    "site_flops",
    "skipped_blocks_flops",
    "tokens_per_layer",
    "unpruned_flops",
    "vit_site_shape",
    "vit_skip_flops",
]
