"""Token reduction in a multimodal LLM, on an unmodified transformers model: hooks, no forked modeling file.

A method runs at ``pre_llm`` (on the LLM's input embeddings) or ``llm.<k>`` (before decoder layer ``k``)
during the prefill; ``vit.<i>`` sites run in the vision tower (LLaVA's through the vision handle, Qwen2-VL's
packed one through ``tokensift.reduce_packed``), and the LLM's input loses the dropped patches. What is kept
is chosen once, in the prefill, and decoding continues on that choice:

- **Layouts.** Each run of decoder layers between two sites shares one *layout*: which original token each
  sequence slot (and so each KV-cache slot) holds. Samples keep different counts, so a layout is
  left-padded to the longest sample with masked slots; the last slot of every sample stays its last
  token, which is what ``generate()`` reads. Layers before a site keep the longer layout, so the cache
  lengths differ per layer.
- **Positions.** Kept tokens keep their original position ids: ``pre_llm`` gathers the position ids
  (1-D, or Qwen2-VL's 3-D M-RoPE) with the embeddings; ``llm.<k>`` gathers the rotary embeddings the
  model computed once for the whole sequence. Decoded tokens continue from the unpruned length (the
  model's own rope deltas, ``generate()``'s position ids), never from the shorter cache.
- **Masks.** Each layer must see a mask as long as its own cache. ``pre_llm`` hands the LLM a 2-D mask
  over the new layout and the model builds its mask as usual; layers of a later layout get, through a
  pre-hook, the mask transformers' own mask factory builds from that layout's 2-D mask and *that
  layer's* cache length, in the format of whatever attention kernel the model uses.
- **Output.** The LLM's last hidden states are scattered back to the unpruned length (dropped tokens
  read zero), so logits line up with ``input_ids`` and labels, and batches keep their shape.
- **Generated tokens' KV (a method with ``kv_eviction_layer``, ``dynamic_llava``'s output-text predictor).** In
  decoding, the method decides at the input of that layer whether each new token's KV entry stays; the token is
  attended to in its own step, then a dropped entry leaves the cache of that layer and every later one. Samples
  drop different counts, so the generated part of those layers' caches holds each sample's kept entries packed to
  the left, padded to the longest with masked slots; those layers get masks sized by their own cache, and
  positions stay the unpruned ones. In mask (training) mode the answer tokens (``conceal()``) take the method's
  policy as a key bias from that layer on instead, the same mechanism as visual tokens.
"""

from __future__ import annotations

import inspect
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask

from tokensift import attention as attn
from tokensift.backbones.mllm import TEXT, MLLMAdapter, Site, TowerCall
from tokensift.budget import Budget
from tokensift.compact import check_decision, gather_last, gather_tokens, identity_index, padded_layout
from tokensift.reduce import PruningHandle
from tokensift.reduce_packed import FrameTower, PackedTowerHandle
from tokensift.scorers.base import TokenMethod, check_site_input
from tokensift.state import SampleCounter, TokenState, _hash_ints, checked_samples, keyed_uniform

HANDLE_ATTRIBUTE = "_tokensift_handle"


@dataclass
class MLLMSiteRecord:
    """What happened at one site in the last prefill."""

    site: str
    # gather mode: [B, K] index in the unpruned LLM input of each slot after the site, -1 padding; mask mode: None
    kept_orig_index: Tensor | None
    kept_visual: Tensor  # [B] visual tokens left after the site (mask mode: the policy's sum, differentiable)
    num_visual: Tensor  # [B] visual tokens in the unpruned input
    target: Tensor  # [B] visual tokens the budget asked for
    hidden: Tensor | None = None  # [B, K, D] the slots' hidden states right after the site
    policy: Tensor | None = None  # mask mode: [B, L] cumulative keep policy over the LLM input (text 1)

    @property
    def keep_fraction(self) -> Tensor:
        return self.kept_visual.float() / self.num_visual.clamp(min=1).float()


@dataclass
class GeneratedTokens:
    """What a method with ``kv_eviction_layer`` sees of the tokens whose KV entries it may drop, at the input of that
    decoder layer: the new token(s) of a decoding step, or in mask (training) mode the whole teacher-forced sequence
    with the answer tokens as candidates."""

    hidden: Tensor  # [B, T, D] the input of the eviction layer
    candidates: Tensor  # [B, T] bool: generated (decoding) / answer (training) tokens; nothing else is ever dropped
    step: Tensor  # [B, T] long: each candidate's index among its sample's generated / answer tokens (-1 elsewhere)
    sample_index: Tensor  # [B] each row's sample (set_samples, else the running count; beams share)
    draw: tuple[int, ...]
    layer: int

    def uniform(self, seed: int, stream: str = "") -> Tensor:
        """``[B, T]`` noise in ``[0, 1)``: a hash of (seed, stream, draw, layer, the row's sample, the token's step),
        so a sample's draw does not depend on its batch (as ``TokenState.uniform``)."""
        prefix = _hash_ints(seed, zlib.crc32(stream.encode()), self.layer, len(self.draw), *self.draw)
        return keyed_uniform(prefix, self.sample_index.to(self.step.device), self.step.clamp(min=0))


@dataclass
class MLLMGeneratedRecord:
    """What a method with ``kv_eviction_layer`` did to the generated (decoding) or answer (mask mode) tokens."""

    layer: int  # dropped entries leave the KV cache of this decoder layer and every later one
    kept: Tensor  # [B] tokens whose KV entry stays (mask mode: the policy's sum over the answer, differentiable)
    num: Tensor  # [B] tokens decided on (answer / generated tokens)
    target: Tensor | None = None  # mask mode: [B] tokens the method aims to keep (its budget term)
    policy: Tensor | None = None  # mask mode: [B, L] the keep policy over the sequence (1 off the answer)
    keep: Tensor | None = None  # decoding: [B, T] bool, each generated token's decision in order

    @property
    def keep_fraction(self) -> Tensor:
        return self.kept.float() / self.num.clamp(min=1).float()


@dataclass
class _Layout:
    """The tokens a run of decoder layers (and their KV cache) holds, from ``start_layer`` on."""

    start_layer: int  # first decoder layer with this layout; 0 means the LLM's own input
    slot_orig: Tensor  # [B, S] long: index of the token in the unpruned input, -1 for a padding slot
    slot_valid: Tensor  # [B, S] bool
    rotary: tuple[Tensor, Tensor] | None = None  # prefill: the model's (cos, sin), gathered to this layout
    # prefill: id of a layer's unpruned (cos) -> its (cos, sin) gathered, for LMs whose layers use different rotary
    # tables (Molmo2's scaled / unscaled layers); the site layer's own is ``rotary``
    rotary_by_source: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    position_ids: Any = None  # prefill: the position ids the model passes its layers, gathered


@dataclass
class _Run:
    """One prefill and the decoding that continues from its cache."""

    batch: int
    length: int  # tokens in the unpruned LLM input
    kinds: Tensor  # [B, L] TEXT / IMAGE / VIDEO
    image_id: Tensor
    coords: Tensor
    num_visual: Tensor  # [B]
    counts: dict[str, Tensor]  # site -> [B] visual tokens to keep
    active: list[Site]  # LLM-side sites that prune something in this prefill
    cache: Any
    layouts: list[_Layout]
    prefill: bool = True
    decoded: int = 0  # tokens appended after the prefill
    tower_scores: Tensor | None = None
    tower_keys: Tensor | None = None
    capture: dict | None = None  # attention of layer k-1 for the site llm.k
    keys: Tensor | None = None  # key projection of layer k-1 for the site llm.k
    new_mask: Tensor | None = None  # decoding: the 2-D mask of the tokens appended after the prefill
    masks: dict[int, Any] = field(default_factory=dict)  # layout index -> mask of this forward pass
    records: list[MLLMSiteRecord] = field(default_factory=list)
    sample_index: Tensor | None = None  # [B] each row's sample (set_samples, else the running count; beams share)
    draw: tuple[int, ...] = ()
    position: Tensor | None = None  # [B, L] each token's position in its sample's own sequence (padding not counted)
    concealed: Tensor | None = None  # [B, L] tokens the method must not read (conceal())
    # mask mode: (first decoder layer, [B, L] key bias) of each policy in force, in depth order
    policies: list[tuple[int, Tensor, Tensor]] = field(default_factory=list)
    # [B, L] the prefill's bidirectional blocks (MLLMFamily.block_sequence_ids: Molmo2's multimodal tokens), or None
    blocks: Tensor | None = None
    # generated tokens' KV eviction (a method with kv_eviction_layer): the layer it acts from
    kv_layer: int | None = None
    # decoding: [B, G] which slots of the generated part of layers >= kv_layer's caches hold a kept entry (the
    # entries of each sample packed to the left); None until an entry is first dropped (those caches are unpruned)
    gen_valid: Tensor | None = None
    pending_keep: Tensor | None = None  # decoding: [B, steps] this step's decisions, applied after the LLM's forward
    generated_policy: tuple[int, Tensor, Tensor] | None = None  # mask mode: (layer, [B, L] answer policy, its bias)
    generated_records: list[MLLMGeneratedRecord] = field(default_factory=list)

    def policy_at(self, layer: int) -> tuple[Tensor, Tensor] | None:
        """Mask mode: the (policy, its attention bias) decoder layer ``layer`` sees, if any site acted before it."""
        found = [(policy, bias) for start, policy, bias in self.policies if start <= layer]
        return found[-1] if found else None

    def layout_of(self, layer: int) -> int:
        return max(i for i, layout in enumerate(self.layouts) if layout.start_layer <= layer)


class _TowerCapture(dict):
    """The capture slot of the scored tower block: each attention call of it appends (Qwen2-VL calls it once per
    image or frame, LLaVA once per batch), where a plain dict would keep only the last."""

    def __init__(self, call: TowerCall):
        super().__init__()
        self.call = call

    def __setitem__(self, key, value):
        (self.call.attention if key == "attention" else self.call.keys).append(value)


class MLLMPruningHandle:
    """A method applied to a multimodal LLM. ``remove()`` (or leaving the ``with`` block) restores it exactly."""

    def __init__(
        self,
        adapter: MLLMAdapter,
        method: TokenMethod,
        budget: Budget,
        sites: list[str] | None = None,
        mode: str = "gather",
    ):
        if mode not in ("gather", "mask"):
            raise ValueError(f"mode must be 'gather' (inference) or 'mask' (training), got {mode!r}")
        if mode == "mask" and method.merges:
            raise ValueError(f"{method.name} merges tokens and only runs in gather mode")
        self.adapter, self.method, self.budget, self._mode = adapter, method, budget, mode
        self.model = adapter.model
        self.family = adapter.family
        names = list(sites or method.config.sites or method.default_sites(adapter))
        try:
            parsed = sorted((adapter.parse_site(name) for name in names), key=lambda s: s.depth)
        except ValueError as error:
            if sites or method.config.sites:
                raise
            option = " (its layer option)" if hasattr(method.config, "layer") else ""
            raise ValueError(
                f"{method.name}'s default sites {names}{option} do not fit this model: {error} Pass sites=[...] "
                "(or the method's layer=) within that range."
            ) from error
        if len({s.name for s in parsed}) != len(parsed):
            raise ValueError(f"sites must be distinct, got {names}")
        for site in parsed:
            if site.kind not in method.site_kinds:
                raise ValueError(
                    f"{method.name} cannot run at site {site.name!r}; it runs at {list(method.site_kinds)} sites "
                    f"({', '.join(s for s in adapter.sites() if adapter.parse_site(s).kind in method.site_kinds)})."
                )
        kinds = {site.kind for site in parsed}
        if "vit" in kinds and len(kinds) > 1:
            raise ValueError("give either vit.<i> sites or pre_llm / llm.<k> sites, not both in one handle.")
        self.sites = [site.name for site in parsed]
        self._parsed = parsed
        self._kv_layer = getattr(method, "kv_eviction_layer", None)
        if self._kv_layer is not None:
            if isinstance(self._kv_layer, bool) or not isinstance(self._kv_layer, int):
                raise ValueError(f"{method.name}.kv_eviction_layer must be a layer index, got {self._kv_layer!r}")
            if not 1 <= self._kv_layer < adapter.num_layers:
                raise ValueError(
                    f"{method.name} evicts generated tokens' KV from decoder layer {self._kv_layer}; this model has "
                    f"layers 0 .. {adapter.num_layers - 1} and the layer must be 1 .. {adapter.num_layers - 1}."
                )
            if "sliding_attention" in (getattr(adapter.text_config, "layer_types", None) or []):
                raise ValueError(
                    "evicting generated tokens' KV needs full-attention decoder layers; this model has "
                    "sliding-window layers."
                )
            if "vit" in kinds:
                raise ValueError(f"{method.name} evicts generated tokens' KV in the LLM; give it llm.<k> sites.")
        budget.counts(self.sites, 1000)  # a per-site budget must name exactly these sites: fail before hooking
        if getattr(self.model, HANDLE_ATTRIBUTE, None) is not None:
            raise ValueError("this model already has a tokensift method applied; remove() its handle first.")
        if "llm" in kinds and "sliding_attention" in (getattr(adapter.text_config, "layer_types", None) or []):
            raise ValueError("llm.<k> sites need full-attention decoder layers; this model has sliding-window layers.")

        self._vision_handle: PruningHandle | PackedTowerHandle | None = None
        self.enabled = True
        self.last_records: list[MLLMSiteRecord] = []
        self.last_generated_records: list[MLLMGeneratedRecord] = []
        self._reordering: Any = None  # the cache whose reorder_cache this handle wrapped (beam search)
        # [B] text (and special) tokens and visual tokens per sample of the last prefill with visual tokens
        self.last_num_text: Tensor | None = None
        self.last_num_visual: Tensor | None = None
        self._run: _Run | None = None
        self._inputs: dict | None = None
        # what the vision tower did for the coming prefill: generate() runs the tower *before* the first
        # forward (and an uncached generate() reuses that one encoding for every step), so this outlives a
        # forward pass and is cleared only when the tower runs again after a prefill used it
        self._tower_calls: list[TowerCall] = []
        self._tower_used = False
        # what the model's feature method was given for the coming tower call (families with watch_feature_calls)
        self._encoding: tuple[int, Tensor, Tensor] | None = None
        self._stop_watching = None
        self._model_inputs: dict | None = None  # the last model call's inputs, enabled or not (decoding reads its mask)
        self._samples = SampleCounter()  # rows of prefills without set_samples, numbered in arrival order
        self._next_samples: tuple[Tensor | None, tuple[int, ...]] | None = None
        self._concealed: Tensor | None = None  # conceal(): tokens the method must not read (a teacher-forced answer)
        self._hooks: list = []
        self._on_remove: list = []
        self._restore_attn: list[tuple[nn.Module, str]] = []
        self._forward_signature = inspect.signature(self.model.forward)
        setattr(self.model, HANDLE_ATTRIBUTE, self)
        try:
            self._install()
        except Exception:
            self.remove()
            raise

    # -- setup ----------------------------------------------------------------------------------
    def _install(self) -> None:
        adapter, parsed = self.adapter, self._parsed
        self._hooks.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        # registered before the vision handle's, so a tower call is on record when the tower's blocks run
        self._hooks.append(adapter.tower.register_forward_pre_hook(self._on_tower_call, with_kwargs=True))
        if hasattr(self.family, "watch_feature_calls"):  # the tower's arguments do not say what it encodes (Molmo2)
            self._stop_watching = self.family.watch_feature_calls(self.model, self._on_feature_call)
        if parsed[0].kind == "vit" and self.family.packed_tower:
            frames = None
            if self.family.frame_batched_tower:  # Molmo2: frames batched, LLM tokens pooled from processor windows
                model, family = self.model, self.family
                frames = FrameTower(lambda on_call: family.watch_feature_calls(model, on_call), family.pooled_layout)
            self._vision_handle = PackedTowerHandle(
                adapter.tower,
                adapter.tower_blocks,
                self.family.projector(self.model),
                None if frames is not None else self.family.merge_size(self.model),
                self.method,
                self.budget,
                self.sites,
                on_kept=self._keep_tower_tokens,
                attention_modules=[self.family.tower_attention(block) for block in adapter.tower_blocks],
                mode=self.mode,
                on_policy=self._keep_tower_policy,
                frames=frames,
            )
            self._wrap_attention(adapter.tower)  # mask mode hands its blocks' attention the policy, chunk by chunk
        elif parsed[0].kind == "vit":
            self._vision_handle = PruningHandle(
                adapter.vision_adapter, self.method, self.budget, sites=self.sites, mode=self.mode
            )
            projector = self.family.projector(self.model)
            self._hooks.append(projector.register_forward_hook(self._expand_pruned_features))
        if self.method.needs_tower_attention:
            if not any(module is adapter.tower for module, _ in self._restore_attn):
                self._wrap_attention(adapter.tower)
            block = adapter.tower_blocks[self.family.scored_tower_block(self.model)]
            self._hooks.append(block.register_forward_pre_hook(self._capture_tower_block))
        lm = adapter.language_model
        self._hooks.append(lm.register_forward_pre_hook(self._on_lm_call, with_kwargs=True))
        self._hooks.append(lm.register_forward_hook(self._after_lm, with_kwargs=True))
        llm_sites = [s for s in parsed if s.kind == "llm"]
        # always: mask mode (set now or later through `mode`) puts a policy on every layer's call; a call without one
        # goes to exactly the model's own kernel, so gather mode and keep_ratio=1 are unchanged
        self._wrap_attention(lm)
        for index, layer in enumerate(adapter.layers):
            self._hooks.append(layer.register_forward_pre_hook(self._before_layer(index), with_kwargs=True))
        if self.method.needs_keys:
            for site in llm_sites:
                k_proj = adapter.attention_modules[site.index - 1].k_proj
                self._hooks.append(k_proj.register_forward_hook(self._capture_keys(site.index - 1)))

    def _wrap_attention(self, module: nn.Module) -> None:
        original = module.config._attn_implementation
        if attn.base_name(original) != original:
            raise ValueError("this model already has a tokensift method applied; remove() its handle first.")
        self._restore_attn.append((module, original))
        module.set_attn_implementation(attn.wrapped_name(original))

    # -- public ---------------------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """``gather`` (inference: dropped tokens leave the sequence) or ``mask`` (training: a key bias per policy)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("gather", "mask"):
            raise ValueError(f"mode must be 'gather' (inference) or 'mask' (training), got {value!r}")
        if value == "mask" and self.method.merges:
            raise ValueError(f"{self.method.name} merges tokens and only runs in gather mode")
        if self._vision_handle is not None:  # first: a packed tower refuses mask mode under flash attention
            self._vision_handle.mode = value
        self._mode = value

    @property
    def enabled(self) -> bool:
        """Off: the next prefills run unpruned (a teacher pass); a decode already running keeps its layout."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = bool(value)
        if self._vision_handle is not None:
            self._vision_handle.enabled = self._enabled

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._stop_watching is not None:
            self._stop_watching()
            self._stop_watching = None
        if self._vision_handle is not None:
            self._vision_handle.remove()
            self._vision_handle = None
        for module, original in reversed(self._restore_attn):
            module.set_attn_implementation(original)
        self._restore_attn.clear()
        for module in self.model.modules():
            if hasattr(module, attn.CALL_ATTRIBUTE):
                delattr(module, attn.CALL_ATTRIBUTE)
        if getattr(self.model, HANDLE_ATTRIBUTE, None) is self:
            delattr(self.model, HANDLE_ATTRIBUTE)
        self._unwrap_reorder()
        self._run = None
        while self._on_remove:
            self._on_remove.pop()()

    def on_remove(self, callback) -> None:
        """Call ``callback`` when ``remove()`` runs (``ts.apply`` unloads the LoRA adapter it loaded)."""
        self._on_remove.append(callback)

    def __enter__(self) -> MLLMPruningHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def set_budget(self, keep_ratio=None, keep_count=None) -> None:
        budget = Budget(keep_ratio=keep_ratio, keep_count=keep_count)
        budget.counts(self.sites, 1000)
        self.budget = budget
        if self._vision_handle is not None:
            self._vision_handle.budget = budget

    def set_samples(self, index: Tensor | None, draw: int | tuple[int, ...] = ()) -> None:
        """Name the samples of the next prefill: ``index`` ``[B]``, each sample's dataset index (``batch["index"]``).

        As ``PruningHandle.set_samples``: methods that draw noise (``random``, the benchmark's oracle) make each
        sample's draw a function of (seed, index, ``draw``), whatever batch it is in; ``generate()``'s copies of a
        sample (beams) share it. Applies to the next prefill only; without it samples are numbered in arrival order.
        """
        self._next_samples = checked_samples(index, draw)

    def conceal(self, tokens: Tensor | None) -> None:
        """Tokens ``[B, L]`` (bool, over the model's input) the method must not read in the coming prefills: a
        teacher-forced answer, which inference never has when it chooses (``None``: none). The model still runs on
        them and nothing drops them; the method's state marks them as padding. The trainers set it per batch
        (``FrozenBackboneTrainer.model_inputs``); a prefill of another shape is refused while it is set. In mask mode
        they are also the answer whose KV entries a method with ``kv_eviction_layer`` decides on (token by token, as
        in decoding: each reads only what precedes it)."""
        self._concealed = None if tokens is None else torch.as_tensor(tokens).bool()

    def site_counts(self, num_visual: int) -> dict[str, int]:
        """Visual tokens kept after each site, for a sample with ``num_visual`` of them."""
        return self.budget.counts(self.sites, num_visual)

    @property
    def visual_tokens_per_layer(self) -> Tensor | None:
        """``[B, num_layers]``: visual tokens entering each decoder layer, per sample, in the last prefill.

        What the analytic FLOPs count (``tokensift.flops.mllm_prefill_flops``); ``None`` before any
        prefill with visual tokens.
        """
        if self.last_num_visual is None:
            return None
        per_layer = self.last_num_visual.unsqueeze(1).repeat(1, self.adapter.num_layers)
        for record in self.last_records:  # in depth order; vit.<i> and pre_llm shape the LLM's input
            site = self.adapter.parse_site(record.site)
            start = site.index if site.kind == "llm" else 0
            per_layer[:, start:] = record.kept_visual.to(per_layer.device).unsqueeze(1)
        return per_layer

    @property
    def exit_layers(self) -> Tensor | None:
        """``[B]``: the first decoder layer that saw none of the sample's visual tokens in the last prefill.

        ``k`` for a sample whose visual tokens all left at ``llm.<k>`` (DyVTE's exit layer), 0 for one with
        none left (or none at all) at the LLM's input, ``num_layers`` for one that kept some to the end.
        """
        per_layer = self.visual_tokens_per_layer
        return None if per_layer is None else (per_layer > 0).sum(1)  # counts never grow with depth

    @property
    def kept_orig_index(self) -> Tensor | None:
        """``[B, K]`` LLM-input indices of the slots after the last site of the last prefill (-1: padding)."""
        return self.last_records[-1].kept_orig_index if self.last_records else None

    # -- the model's inputs ---------------------------------------------------------------------
    def _on_model_call(self, module: nn.Module, args: tuple, kwargs: dict):
        bound = self._forward_signature.bind_partial(*args, **kwargs).arguments
        inputs = {**bound.pop("kwargs", {}), **bound}
        # disabled: no new prefill is pruned, but a decode already running on a pruned cache keeps its layout
        self._inputs = inputs if self.enabled else None
        self._model_inputs = inputs
        run, cache = self._run, inputs.get("past_key_values")
        if run is None or cache is None or cache is not run.cache or _cache_length(cache) == 0:
            return None
        # decoding on a pruned cache: a model that would derive positions from the cache length gets the
        # unpruned positions instead (the cache is shorter than the sequence it stands for)
        if inputs.get("position_ids") is None and not (
            self.family.multimodal_rope and inputs.get("attention_mask") is not None
        ):
            tokens = inputs.get("input_ids")
            tokens = tokens if tokens is not None else inputs.get("inputs_embeds")
            steps = torch.arange(tokens.shape[1], device=tokens.device) + run.length + run.decoded
            kwargs["position_ids"] = self.family.decode_position_ids(self.model, steps.expand(run.batch, -1))
        return args, kwargs

    # -- vision tower ---------------------------------------------------------------------------
    def _on_tower_call(self, module: nn.Module, args: tuple, kwargs: dict):
        if self._tower_used:
            self._tower_calls, self._tower_used = [], False
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        tokens = self.family.encoded_tokens(self.model, args, kwargs)
        self._tower_calls.append(TowerCall(grid_thw=grid, tokens=tokens, attention=[], keys=[]))
        if self._encoding is not None:
            self.family.describe_call(self._tower_calls[-1], *self._encoding)
            self._encoding = None
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        index = self._next_samples[0] if self._next_samples is not None else None
        if isinstance(self._vision_handle, PackedTowerHandle):  # one grid row per image / video
            rows = self._vision_handle.call_items(args, kwargs)
        else:  # one pixel row per image
            rows = None if pixel_values is None else pixel_values.shape[0]
        if self._vision_handle is not None and index is not None and rows == index.shape[0]:  # draws follow samples
            self._vision_handle.set_samples(*self._next_samples)

    def _capture_tower_block(self, module: nn.Module, args: tuple):
        attention_module = self.family.tower_attention(module)
        call = {"capture": _TowerCapture(self._tower_calls[-1])} if self._tower_calls and self.enabled else None
        setattr(attention_module, attn.CALL_ATTRIBUTE, call)

    def _expand_pruned_features(self, module: nn.Module, args: tuple, output: Tensor):
        """vit sites: put the projected features of the kept patches back on the full patch grid.

        The model checks that every image placeholder gets a feature; the dropped placeholders are removed
        from the LLM's input right after (``_on_lm_call``), so the zeros written here are never seen.
        """
        handle = self._vision_handle
        if self.mode == "mask":
            self._record_tower_policy(output)
            return None
        kept = handle.kept_orig_index if handle is not None and handle.enabled else None
        if kept is None or not self.enabled:
            return None
        full = self.family.features_per_image(self.model)
        drop_cls = output.shape[1] == kept.shape[1] - 1  # LLaVA's "default" strategy drops [CLS] from features
        feature_index = kept[:, 1:] - 1 if drop_cls else kept
        expanded = output.new_zeros(output.shape[0], full, output.shape[-1])
        expanded.scatter_(1, feature_index.unsqueeze(-1).expand(-1, -1, output.shape[-1]), output)
        keep = torch.zeros(output.shape[0], full, dtype=torch.bool, device=output.device)
        keep.scatter_(1, feature_index, True)
        self._keep_tower_tokens(keep.reshape(-1))
        return expanded

    def _record_tower_policy(self, output: Tensor) -> None:
        """vit sites, mask mode: the tower's cumulative keep policy per projected feature, for the LLM's keys."""
        handle = self._vision_handle
        records = [r for r in handle.last_records if r.policy is not None] if handle is not None else []
        if not records or not self.enabled or not self._tower_calls:
            return
        policy = records[-1].policy
        full = self.family.features_per_image(self.model)
        if output.shape[1] != full or policy.shape[1] - full not in (0, 1):
            raise ValueError(
                f"mask mode at vit sites: the tower's policy covers {policy.shape[1]} tokens but the projector gives "
                f"{output.shape[1]} features per image; this LLaVA layout is not supported in mask mode."
            )
        self._tower_calls[-1].policy = policy[:, policy.shape[1] - full :].reshape(-1)  # [CLS] dropped by the model

    def _keep_tower_policy(self, policy: Tensor) -> None:
        """A packed tower's vit sites, mask mode: the current tower call's keep policy per LLM token (merge group)."""
        if self._tower_calls and self.enabled:
            self._tower_calls[-1].policy = policy

    def _keep_tower_tokens(self, keep: Tensor) -> None:
        """vit sites: which LLM tokens of the current tower call survived the tower."""
        if self._tower_calls and self.enabled:
            self._tower_calls[-1].kept = keep

    # -- the language model ---------------------------------------------------------------------
    def _on_feature_call(self, kind: int, pooling: Tensor, grids: Tensor) -> None:
        """The model's feature method is about to run the tower (``watch_feature_calls``)."""
        if self._encoding is None:  # get_video_features calls get_image_features: the outer call names the kind
            self._encoding = (kind, pooling, grids)

    def _on_lm_call(self, module: nn.Module, args: tuple, kwargs: dict):
        inputs, self._inputs = self._inputs, None
        model_inputs, self._model_inputs = self._model_inputs, None
        cache = kwargs.get("past_key_values")
        run = self._run
        if run is not None and cache is not None and cache is run.cache and _cache_length(cache) > 0:
            return self._continue_decoding(run, kwargs, model_inputs)
        self._run = None
        self._tower_used = True  # this forward read the tower's last encoding: the next tower call starts afresh
        if inputs is None:
            return None
        return self._start_prefill(inputs, kwargs)

    def _start_prefill(self, inputs: dict, kwargs: dict):
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            return None
        samples, self._next_samples = self._next_samples or (None, ()), None
        self.last_num_text = self.last_num_visual = None
        self.last_generated_records = []
        self._unwrap_reorder()
        kinds = self.family.token_kinds(self.model, inputs).to(embeds.device)
        if not bool((kinds != TEXT).any()):
            return None  # a text-only forward: nothing to prune
        cache = kwargs.get("past_key_values")
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(
                f"pruning needs a dynamic KV cache (generate()'s default); got {type(cache).__name__}, whose "
                "layers cannot hold different lengths."
            )
        mask = self.family.lm_padding_mask(inputs, kwargs)
        if mask is not None and mask.dim() != 2:
            raise ValueError("pass a 2-D attention_mask [batch, tokens]; tokensift builds the 4-D masks itself.")
        batch, length = kinds.shape
        valid = torch.ones_like(kinds, dtype=torch.bool) if mask is None else mask.bool()
        calls = self._tower_calls
        repeat = _row_repeat(kinds, calls)
        sample_index, draw = self._sample_rows(samples, batch, repeat, kinds.device)  # every visual prefill counts
        if repeat > 1:  # the grids in the inputs, if any, were repeated too; the tower calls' are per sample
            inputs = {k: v for k, v in inputs.items() if k not in ("image_grid_thw", "video_grid_thw")}
        image_id, coords = (
            t.repeat_interleave(repeat, dim=0)
            for t in self.family.token_layout(self.model, inputs, kinds[::repeat], calls)
        )
        num_visual = ((kinds != TEXT) & valid).sum(1)
        self.last_num_text, self.last_num_visual = ((kinds == TEXT) & valid).sum(1), num_visual
        llm_sites = [s for s in self._parsed if s.kind != "vit"]
        counts = _per_sample_counts(self.budget, [s.name for s in llm_sites], num_visual)
        active, previous = [], num_visual
        trains = self.mode == "mask" and self.method.kind == "learned"  # a learned policy acts at every budget
        for site in llm_sites:
            if self.method.decides_exits or trains or bool((counts[site.name] < previous).any()):
                active.append(site)
            previous = torch.minimum(previous, counts[site.name])
        tower_policy = self._tower_policy(inputs, calls, kinds[::repeat]) if self.mode == "mask" else None
        forced = self._tower_keep(inputs, calls, kinds[::repeat])
        # gather mode: the decoding that follows may evict generated tokens' KV; mask mode: the answer's policy
        evicts = self._kv_layer is not None and (self.mode == "gather" or self._concealed is not None)
        if not active and forced is None and tower_policy is None and not evicts:
            self.last_records = []
            return None
        layout = _Layout(0, torch.arange(length, device=kinds.device).expand(batch, -1), valid)
        run = _Run(batch, length, kinds, image_id, coords, num_visual, counts, active, cache, [layout])
        run.kv_layer = self._kv_layer if evicts else None
        blocks = self.family.block_sequence_ids(self.model, inputs)
        run.blocks = None if blocks is None else blocks.to(kinds.device)
        self.last_generated_records = run.generated_records
        if self._concealed is not None:
            if self._concealed.shape != kinds.shape:
                raise ValueError(
                    f"conceal() named tokens of shape {tuple(self._concealed.shape)} but the prefill is "
                    f"{tuple(kinds.shape)}; set it for this batch, or conceal(None)."
                )
            run.concealed = self._concealed.to(kinds.device) & valid
        self._run, self.last_records = run, run.records
        run.sample_index, run.draw = sample_index, draw
        run.position = valid.long().cumsum(1) - 1
        if self.method.needs_tower_attention and calls:
            run.tower_scores, run.tower_keys = (
                t.repeat_interleave(repeat, dim=0)
                for t in self.family.tower_token_scores(self.model, calls, kinds[::repeat], inputs)
            )
        pre_llm = next((s for s in active if s.kind == "pre_llm"), None)
        if self.mode == "mask":
            self._start_masked_prefill(run, embeds, tower_policy, repeat, pre_llm, layout)
            return None
        if forced is None and pre_llm is None:
            return None
        if forced is not None:
            keep = forced.repeat_interleave(repeat, dim=0) & valid
            target = keep.logical_and(kinds != TEXT).sum(1)
            site_name = self.sites[-1]
            new_embeds = embeds
        else:
            state = self._state(run, pre_llm, embeds, layout)
            keep, new_embeds = self._select(state, counts[pre_llm.name], layout.slot_valid)
            target, site_name = counts[pre_llm.name], pre_llm.name
        new_layout, source = _relayout(layout, keep, start_layer=0)
        run.layouts = [new_layout]
        gathered = gather_tokens(new_embeds, source)
        self._record(run, site_name, new_layout, target, gathered)
        position_ids = kwargs.get("position_ids")
        if position_ids is None:  # what the LM would use: positions counted from 0 over the whole input
            position_ids = torch.arange(length, device=embeds.device).expand(batch, -1)
            if self.family.multimodal_rope:
                position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        kwargs["inputs_embeds"] = gathered
        kwargs["attention_mask"] = new_layout.slot_valid.long()
        if run.blocks is not None:  # the model's bidirectional blocks, over the kept tokens: the LM takes a 4-D mask
            kwargs["attention_mask"] = self._layout_mask(run, new_layout, gathered, kwargs.get("past_key_values"))
        kwargs["position_ids"] = gather_last(position_ids, new_layout.slot_orig, batch)
        return (), kwargs

    def _start_masked_prefill(self, run: _Run, embeds: Tensor, tower_policy, repeat: int, pre_llm, layout) -> None:
        """Mask (training) mode: nothing is gathered; each site's keep policy becomes a key bias for the decoder
        layers from that site on (``_masked_layer``), so the sequence, positions and masks stay the model's own."""
        if tower_policy is not None:
            policy = tower_policy.repeat_interleave(repeat, dim=0).to(embeds.device)
            self._add_policy(run, self.sites[-1], 0, policy)
        if pre_llm is not None:
            state = self._state(run, pre_llm, embeds, layout)
            self._add_policy(run, pre_llm.name, 0, self._masked_policy(run, pre_llm, state))

    def _tower_policy(self, inputs: dict, calls: list[TowerCall], kinds: Tensor) -> Tensor | None:
        """vit sites, mask mode: ``[B, L]`` float, the tower's keep policy on each visual token (text 1)."""
        if not any(call.policy is not None for call in calls):
            return None
        policy = torch.ones(kinds.shape, device=kinds.device)
        call_kinds = self.family.call_kinds(self.model, inputs, calls, kinds)
        for kind in set(call_kinds):
            parts = [
                call.policy if call.policy is not None else torch.ones(call.tokens)
                for call, call_kind in zip(calls, call_kinds, strict=True)
                if call_kind == kind
            ]
            policy = policy.masked_scatter(kinds == kind, torch.cat([p.to(kinds.device).float() for p in parts]))
        return policy

    def _masked_policy(self, run: _Run, site: Site, state: TokenState) -> Tensor:
        """Mask mode: the method's keep policy at ``site``, ``[B, L]``, cumulative, text and padding 1."""
        previous = run.policy_at(site.index if site.kind == "llm" else 0)
        state.policy = None if previous is None else previous[0]
        check_site_input(state.hidden, state.valid, self.method.name, state.site)
        policy = self.method.keep_policy(state, run.counts[site.name])
        if policy.shape != state.valid.shape:
            raise ValueError(
                f"{self.method.name}.keep_policy returned {tuple(policy.shape)}, expected {tuple(state.valid.shape)}"
            )
        return torch.where(state.protected | ~state.valid, torch.ones_like(policy), policy)

    def _add_policy(self, run: _Run, site: str, start_layer: int, policy: Tensor) -> None:
        run.policies.append((start_layer, policy, attn.policy_bias(policy)))
        visual = (run.kinds != TEXT) & run.layouts[0].slot_valid
        kept = (policy * visual).sum(1)
        record = MLLMSiteRecord(site, None, kept, run.num_visual, run.counts.get(site, kept), None, policy)
        run.records.append(record)

    # -- generated tokens' KV (a method with kv_eviction_layer) ------------------------------------------------
    def _add_generated_policy(self, run: _Run, index: int, hidden: Tensor) -> None:
        """Mask mode, before decoder layer ``index`` (the eviction layer): the method's keep policy over the answer
        tokens (the concealed ones), in force as a key bias from this layer on, multiplied with the visual one."""
        answer = run.concealed
        step = (answer.long().cumsum(1) - 1).masked_fill(~answer, -1)
        tokens = GeneratedTokens(hidden, answer, step, run.sample_index, run.draw, index)
        policy = self.method.generated_keep_policy(tokens)
        if policy.shape != answer.shape:
            raise ValueError(
                f"{self.method.name}.generated_keep_policy returned {tuple(policy.shape)}, "
                f"expected {tuple(answer.shape)}"
            )
        policy = torch.where(answer, policy, torch.ones_like(policy))
        run.generated_policy = (index, policy, attn.policy_bias(policy))
        num = answer.sum(1)
        target = self.method.generated_keep_target(num)
        run.generated_records.append(MLLMGeneratedRecord(index, (policy * answer).sum(1), num, target, policy))

    def _decide_generated(self, run: _Run, hidden: Tensor) -> None:
        """Decoding, before the eviction layer: the method's keep decision for each new token's KV entry."""
        steps = hidden.shape[1]
        candidates = run.new_mask[:, -steps:]
        step = (torch.arange(steps, device=hidden.device) + run.decoded).expand(run.batch, -1)
        tokens = GeneratedTokens(hidden, candidates, step, run.sample_index, run.draw, run.kv_layer)
        keep = self.method.generated_keep(tokens)
        if keep.shape != candidates.shape or keep.dtype != torch.bool:
            raise ValueError(
                f"{self.method.name}.generated_keep returned {keep.dtype} {tuple(keep.shape)}, expected bool "
                f"{tuple(candidates.shape)}"
            )
        run.pending_keep = keep & candidates

    def _evict_generated(self, run: _Run, keep: Tensor) -> None:
        """After a decoding step: drop from the caches of layers >= ``kv_layer`` the new entries the method dropped,
        packing each sample's kept generated entries to the left and cutting the columns no sample needs."""
        steps = keep.shape[1]
        candidates = run.new_mask[:, -steps:]
        if not run.generated_records:
            zeros = torch.zeros(run.batch, dtype=torch.long, device=keep.device)
            run.generated_records.append(MLLMGeneratedRecord(run.kv_layer, zeros, zeros.clone(), keep=keep[:, :0]))
        record = run.generated_records[0]
        record.kept, record.num = record.kept + keep.sum(1), record.num + candidates.sum(1)
        record.keep = torch.cat([record.keep, keep], dim=1)
        previous = run.gen_valid if run.gen_valid is not None else run.new_mask[:, : run.decoded]
        valid = torch.cat([previous, keep], dim=1)
        if run.gen_valid is None and bool(valid.all()):
            return  # nothing dropped yet: those caches are still the unpruned ones
        count = valid.sum(1)
        width = int(count.max()) if count.numel() else 0
        if width == valid.shape[1]:
            run.gen_valid = valid  # every column still holds some sample's entry: the slots are masked
            return
        if bool(valid[:, :width].all()):  # the dropped entries are the last columns: cut them
            source = None
        else:  # each sample's kept entries, in order, packed to the left (padding slots copy a dropped entry)
            source = (~valid).to(torch.uint8).argsort(dim=1, stable=True)[:, :width]
        for layer in _cache_layers(run.cache, self.method.name)[run.kv_layer :]:
            start = layer.keys.shape[2] - valid.shape[1]
            layer.keys = _pack_generated(layer.keys, start, width, source)
            layer.values = _pack_generated(layer.values, start, width, source)
        run.gen_valid = torch.arange(width, device=valid.device).unsqueeze(0) < count.unsqueeze(1)

    def _wrap_reorder(self, run: _Run) -> None:
        """Beam search reorders the cache's rows (``Cache.reorder_cache``): the per-row generated slots follow them."""
        cache = run.cache
        if self._reordering is cache or not callable(getattr(cache, "reorder_cache", None)):
            return
        self._unwrap_reorder()
        original = cache.reorder_cache

        def reorder_cache(beam_idx: Tensor):
            original(beam_idx)
            current = self._run
            if current is not None and current.cache is cache:
                index = beam_idx.to(current.new_mask.device)
                if current.gen_valid is not None:
                    current.gen_valid = current.gen_valid.index_select(0, index)
                for record in current.generated_records:
                    record.kept, record.num = record.kept.index_select(0, index), record.num.index_select(0, index)
                    if record.keep is not None:
                        record.keep = record.keep.index_select(0, index)

        cache.reorder_cache = reorder_cache
        self._reordering = cache

    def _unwrap_reorder(self) -> None:
        cache, self._reordering = self._reordering, None
        if cache is not None and "reorder_cache" in vars(cache):
            del cache.reorder_cache

    def _sample_rows(self, samples: tuple, batch: int, repeat: int, device) -> tuple[Tensor, tuple[int, ...]]:
        """``[B]`` sample index of each row: what ``set_samples`` named, else the running count; a sample's
        ``generate()`` copies (beams, ``repeat`` rows each) share one."""
        index, draw = samples
        if index is None:
            index = self._samples.take(batch // repeat)
        if index.shape[0] == batch // repeat and repeat > 1:
            index = index.repeat_interleave(repeat)
        if index.shape[0] != batch:
            raise ValueError(
                f"set_samples named {index.shape[0]} samples but the prefill has {batch} rows"
                f"{f' ({batch // repeat} samples x {repeat} copies)' if repeat > 1 else ''}; give one index per sample."
            )
        return index.to(device), draw

    def _tower_keep(self, inputs: dict, calls: list[TowerCall], kinds: Tensor) -> Tensor | None:
        """vit sites: ``[B, L]`` bool, the tokens the tower left (text included); ``None`` when it dropped none."""
        if not any(call.kept is not None for call in calls):
            return None
        keep = kinds == TEXT
        call_kinds = self.family.call_kinds(self.model, inputs, calls, kinds)
        for kind in set(call_kinds):
            parts = [
                call.kept if call.kept is not None else torch.ones(call.tokens, dtype=torch.bool)
                for call, call_kind in zip(calls, call_kinds, strict=True)
                if call_kind == kind
            ]
            keep[kinds == kind] = torch.cat([p.to(kinds.device) for p in parts])  # the models' fill order
        return keep

    def _continue_decoding(self, run: _Run, kwargs: dict, model_inputs: dict | None):
        if self.mode == "mask":
            raise ValueError(
                "decoding with a KV cache in mask (training) mode: the policy holds for one forward pass; use gather "
                "mode (the default) for generate(), or pass use_cache=False."
            )
        run.prefill, run.masks = False, {}
        embeds = kwargs["inputs_embeds"]
        steps = embeds.shape[1]
        mask = self.family.lm_padding_mask(model_inputs, kwargs)
        expected = run.length + run.decoded + steps
        if mask is None:
            run.new_mask = torch.ones(run.batch, run.decoded + steps, dtype=torch.bool, device=embeds.device)
        elif mask.dim() != 2 or mask.shape[-1] != expected:
            raise ValueError(
                f"decoding after a pruned prefill needs the 2-D attention_mask of the whole unpruned sequence "
                f"({expected} tokens: {run.length} prompt + {run.decoded} decoded + {steps} new), got "
                f"{tuple(mask.shape)}."
            )
        else:
            run.new_mask = mask[:, run.length :].bool()
        if run.kv_layer is not None:
            if steps != 1:
                raise ValueError(
                    f"{self.method.name} decides per generated token whether its KV entry stays: decode one token per "
                    f"forward (generate()'s default), got {steps} (assisted / speculative decoding is not supported)."
                )
            self._wrap_reorder(run)
        first = run.layouts[0]
        if first.slot_orig.shape[1] != run.length or not bool(first.slot_valid.all()):
            kwargs["attention_mask"] = torch.cat([first.slot_valid, run.new_mask], dim=1).long()
        return (), kwargs

    def _after_lm(self, module: nn.Module, args: tuple, kwargs: dict, output):
        run = self._run
        if run is None:
            return None
        if not run.prefill:
            if run.pending_keep is not None:
                keep, run.pending_keep = run.pending_keep, None
                self._evict_generated(run, keep)
            run.decoded += kwargs["inputs_embeds"].shape[1]
            return None
        run.prefill = False
        run.capture, run.keys, run.masks = None, None, {}
        if run.cache is None:  # the LLM made its cache itself: decoding continues on that one
            run.cache = getattr(output, "past_key_values", None)
        if self.mode == "mask":  # the sequence kept its length: the output is already aligned with the input
            return None
        for layout in run.layouts:
            layout.rotary, layout.position_ids = None, None  # prefill-only; decoding computes its own
            layout.rotary_by_source = {}
        last = run.layouts[-1]
        if last.slot_orig.shape[1] == run.length and bool((last.slot_orig == identity_index(last.slot_orig)).all()):
            # nothing was dropped (an exit method that let every sample keep its tokens): the output is already the
            # unpruned model's, padding slots included, which the scatter below would zero
            return None
        hidden = output.last_hidden_state
        full = hidden.new_zeros(run.batch, run.length, hidden.shape[-1])
        rows = torch.arange(run.batch, device=hidden.device).unsqueeze(1).expand_as(last.slot_orig)
        full[rows[last.slot_valid], last.slot_orig[last.slot_valid]] = hidden[last.slot_valid]
        output.last_hidden_state = full
        return output

    # -- decoder layers -------------------------------------------------------------------------
    def _before_layer(self, index: int):
        attention_module = self.adapter.attention_modules[index]
        wrapped = any(module is self.adapter.language_model for module, _ in self._restore_attn)

        def hook(module: nn.Module, args: tuple, kwargs: dict):
            run = self._run
            if wrapped:
                setattr(attention_module, attn.CALL_ATTRIBUTE, None)
            if run is None:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            if self.mode == "mask":
                self._masked_layer(run, index, hidden, kwargs, attention_module)
                return None
            if run.prefill:
                site = next((s for s in run.active if s.kind == "llm" and s.index == index), None)
                if site is not None:
                    hidden = self._prune_in_llm(run, site, hidden, kwargs)
                if self.method.needs_attention and any(s.kind == "llm" and s.index == index + 1 for s in run.active):
                    run.capture = {}
                    setattr(attention_module, attn.CALL_ATTRIBUTE, {"capture": run.capture})
            elif index == run.kv_layer:
                self._decide_generated(run, hidden)
            which = run.layout_of(index)
            layout = run.layouts[which]
            # decoding after a generated entry left the caches of layers >= kv_layer: those are shorter
            evicted = not run.prefill and run.gen_valid is not None and index >= run.kv_layer
            if layout.start_layer == 0 and not evicted:
                return (hidden, *args[1:]), kwargs  # the LLM built its mask and positions for this layout
            if (which, evicted) not in run.masks:
                cache = kwargs.get("past_key_values")
                run.masks[which, evicted] = self._layout_mask(run, layout, hidden, cache, evicted)
            kwargs["attention_mask"] = run.masks[which, evicted]
            if run.prefill:
                kwargs["position_embeddings"] = _layer_rotary(run, layout, kwargs.get("position_embeddings"))
                if "position_ids" in kwargs:
                    kwargs["position_ids"] = layout.position_ids
            if args:
                return (hidden, *args[1:]), kwargs
            kwargs["hidden_states"] = hidden
            return args, kwargs

        return hook

    def _capture_keys(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: Tensor):
            run = self._run
            if run is not None and run.prefill and any(s.index == layer + 1 for s in run.active):
                run.keys = output.detach().float()

        return hook

    def _masked_layer(self, run: _Run, index: int, hidden: Tensor, kwargs: dict, attention_module: nn.Module) -> None:
        """Mask mode, before decoder layer ``index``: a site here adds its policy; the layer's attention gets the
        bias of the policy in force (and, before a site that reads attention, captures it)."""
        if not run.prefill:
            return
        site = next((s for s in run.active if s.kind == "llm" and s.index == index), None)
        if site is not None:
            state = self._llm_site_state(run, site, hidden, kwargs, run.layouts[0])
            self._add_policy(run, site.name, index, self._masked_policy(run, site, state))
            run.capture, run.keys = None, None
        if index == run.kv_layer and run.concealed is not None and bool(run.concealed.any()):
            self._add_generated_policy(run, index, hidden)
        call = {}
        found = _policy_in_force(run, index)
        if found is not None:
            policy, bias = found
            if attn.needs_policy_attention(policy):  # straight-through zeros: the renormalised policy softmax
                call["policy"] = policy
            else:
                call["policy_bias"] = bias
        if any(s.kind == "llm" and s.index == index + 1 for s in run.active) and self.method.needs_attention:
            run.capture = call["capture"] = {}
        setattr(attention_module, attn.CALL_ATTRIBUTE, call or None)

    def _llm_site_state(self, run: _Run, site: Site, hidden: Tensor, kwargs: dict, current: _Layout) -> TokenState:
        """The state a method sees at ``llm.<k>``, with what it asked for computed on the current layout."""
        state = self._state(run, site, hidden, current)
        rotary = _layer_rotary(run, current, kwargs.get("position_embeddings"))
        if self.method.needs_query_attention:
            state.query_attention = self._last_query_attention(site.index, state, rotary)
        if state.keys is not None and rotary is not None:  # layer k-1's keys as its attention uses them (DART)
            attention = self.adapter.attention_modules[site.index - 1]
            keys = state.keys.view(*state.keys.shape[:2], -1, attention.head_dim).transpose(1, 2)
            cos, sin = (t.expand(keys.shape[0], -1, -1) for t in rotary)
            state.keys = _rotate(attention, keys, cos, sin).transpose(1, 2).flatten(2)
        if self.method.needs_final_norm:
            state.normed_hidden = self.adapter.language_model.norm(hidden)
        return state

    def _prune_in_llm(self, run: _Run, site: Site, hidden: Tensor, kwargs: dict) -> Tensor:
        current = run.layouts[-1]
        state = self._llm_site_state(run, site, hidden, kwargs, current)
        keep, new_hidden = self._select(state, run.counts[site.name], current.slot_valid)
        run.capture, run.keys = None, None
        layout, source = _relayout(current, keep, start_layer=site.index)
        if layout is current:
            return hidden
        layout.rotary = _layer_rotary(run, layout, kwargs.get("position_embeddings"))
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, Tensor) and position_ids.shape[-1] == run.layouts[0].slot_orig.shape[1]:
            layout.position_ids = gather_last(position_ids, _index_in_lm_input(run, layout), run.batch)
        run.layouts.append(layout)
        gathered = gather_tokens(new_hidden, source)
        self._record(run, site.name, layout, run.counts[site.name], gathered)
        return gathered

    def _last_query_attention(self, index: int, state: TokenState, rotary: tuple[Tensor, Tensor]) -> Tensor:
        """``[B, H, N]``: the attention each sample's last text token pays the slots in decoder layer ``index``.

        Layer ``index``'s own input norm, query / key projections (grouped-query heads shared) and rotary
        embedding on its input ``state.hidden``; keys after the query or in padding slots are masked.
        Only that one query row is computed, in float32.
        """
        layer, attention = self.adapter.layers[index], self.adapter.attention_modules[index]
        hidden = layer.input_layernorm(state.hidden)
        batch, slots, _ = hidden.shape
        head_dim = attention.head_dim
        rows = torch.arange(batch, device=hidden.device)
        text = state.protected & state.valid
        last = torch.where(text, torch.arange(slots, device=hidden.device), -1).amax(dim=1).clamp(min=0)
        query = attention.q_proj(hidden[rows, last].unsqueeze(1)).view(batch, 1, -1, head_dim).transpose(1, 2)
        keys = attention.k_proj(hidden).view(batch, slots, -1, head_dim).transpose(1, 2)
        if hasattr(attention, "q_norm"):  # models with per-head q / k norms (Qwen3) apply them before RoPE
            query, keys = attention.q_norm(query), attention.k_norm(keys)
        cos, sin = (t.expand(batch, -1, -1) for t in rotary)
        query = _rotate(attention, query, cos[rows, last].unsqueeze(1), sin[rows, last].unsqueeze(1))
        keys = _rotate(attention, keys, cos, sin)
        keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # grouped-query attention
        scaling = getattr(attention, "scaling", head_dim**-0.5)
        logits = (query.float() @ keys.float().transpose(-1, -2)).squeeze(2) * scaling  # [B, H, N]
        allowed = state.valid & (torch.arange(slots, device=hidden.device) <= last.unsqueeze(1))
        return logits.masked_fill(~allowed.unsqueeze(1), float("-inf")).softmax(dim=-1)

    def _layout_mask(self, run: _Run, layout: _Layout, hidden: Tensor, cache, evicted: bool = False):
        layer = layout.start_layer
        if run.prefill:
            mask_2d = layout.slot_valid
        elif evicted:  # [layout slots, kept generated entries (padded), this step's tokens]
            mask_2d = torch.cat([layout.slot_valid, run.gen_valid, run.new_mask[:, -hidden.shape[1] :]], dim=1)
            layer = max(layer, run.kv_layer)
        else:
            mask_2d = torch.cat([layout.slot_valid, run.new_mask], dim=1)
        blocks = None  # the model's bidirectional blocks hold in the prefill only (decoded tokens are causal)
        if run.prefill and run.blocks is not None:
            blocks = run.blocks.gather(1, layout.slot_orig.clamp(min=0)).masked_fill(~layout.slot_valid, -1)
        return create_causal_mask(
            config=self.adapter.text_config,
            inputs_embeds=hidden,
            attention_mask=mask_2d,
            past_key_values=cache,
            position_ids=None,
            block_sequence_ids=blocks,
            layer_idx=layer,  # sized by this layer's own (shorter) cache
        )

    # -- the method -----------------------------------------------------------------------------
    def _state(self, run: _Run, site: Site, hidden: Tensor, layout: _Layout) -> TokenState:
        index = layout.slot_orig.clamp(min=0)
        valid = layout.slot_valid
        if run.concealed is not None:  # what the method may read: a teacher-forced answer is padding to it
            valid = valid & ~run.concealed.gather(1, index)
        kind = run.kinds.gather(1, index).masked_fill(~valid, TEXT)
        text = valid & (kind == TEXT)
        positions = torch.arange(index.shape[1], device=index.device)
        last_text = (positions * text).argmax(dim=1)
        text_weights = text.to(hidden.dtype).unsqueeze(-1)
        capture = run.capture or {}
        return TokenState(
            hidden=hidden,
            protected=text,
            orig_index=layout.slot_orig,
            size=torch.ones(index.shape, device=hidden.device),
            grid=(0, 0),
            num_prefix=0,
            site=site.name,
            layer=site.index,
            attention=capture.get("attention") if site.kind == "llm" else None,
            keys=run.keys if site.kind == "llm" else None,
            keep_target=run.counts[site.name].float() / run.num_visual.clamp(min=1).float(),
            valid=valid,
            kind=kind,
            image_id=run.image_id.gather(1, index).masked_fill(~valid | (kind == TEXT), -1),
            coords=run.coords.gather(1, index.unsqueeze(-1).expand(-1, -1, 3)),
            tower_attention=None if run.tower_scores is None else run.tower_scores.gather(1, index),
            tower_keys=None if run.tower_keys is None else gather_tokens(run.tower_keys, index),
            text_mean=(hidden * text_weights).sum(1) / text_weights.sum(1).clamp(min=1),
            text_last=hidden[torch.arange(hidden.shape[0], device=hidden.device), last_text],
            sample_index=run.sample_index,
            draw=run.draw,
            token_key=run.position.gather(1, index),
        )

    def _select(self, state: TokenState, num_keep: Tensor, slot_valid: Tensor) -> tuple[Tensor, Tensor]:
        check_site_input(state.hidden, state.valid, self.method.name, state.site)
        decision = self.method.reduce(state, num_keep)
        check_decision(decision, state, self.method.name)
        hidden = state.hidden if decision.hidden is None else decision.hidden
        concealed = slot_valid & ~state.valid  # tokens the method did not see stay (a teacher-forced answer)
        return (decision.keep & state.valid) | state.protected | concealed, hidden

    def _record(self, run: _Run, site: str, layout: _Layout, target: Tensor, hidden: Tensor) -> None:
        kinds = run.kinds.gather(1, layout.slot_orig.clamp(min=0))
        kept_visual = (layout.slot_valid & (kinds != TEXT)).sum(1)
        run.records.append(MLLMSiteRecord(site, layout.slot_orig, kept_visual, run.num_visual, target, hidden))


# -- layout arithmetic ----------------------------------------------------------------------------------


def _rotate(attention: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x`` ``[B, H, L, d]`` rotated by ``cos`` / ``sin`` ``[B, L, d]`` exactly as ``attention``'s own modeling file
    rotates its queries and keys (its ``apply_rotary_pos_emb``; Llama's where the file has none)."""
    from transformers.models.llama import modeling_llama

    apply = getattr(sys.modules.get(type(attention).__module__), "apply_rotary_pos_emb", None)
    rotated, _ = (apply or modeling_llama.apply_rotary_pos_emb)(x, x, cos.to(x.dtype), sin.to(x.dtype))
    return rotated


def _layer_rotary(run: _Run, layout: _Layout, rotary: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
    """A decoder layer's rotary ``(cos, sin)`` for ``layout`` in the prefill: the LM's own on its own input (layout
    0), else the table the LM computed for that layer over its input, gathered to the layout's slots, once per table
    (Molmo2's layers use a scaled or an unscaled one)."""
    if layout.start_layer == 0 or rotary is None:
        return rotary if layout.start_layer == 0 else layout.rotary
    key = id(rotary[0])
    if key not in layout.rotary_by_source:
        index = _index_in_lm_input(run, layout)
        layout.rotary_by_source[key] = tuple(gather_tokens(t.expand(run.batch, -1, -1), index) for t in rotary)
    return layout.rotary_by_source[key]


def _index_in_lm_input(run: _Run, layout: _Layout) -> Tensor:
    """``[B, S]`` each slot's index in the LM's own input (layout 0: the unpruned input, or pre_llm's kept tokens),
    where the LM computed its positions and rotary tables; padding slots read slot 0."""
    first = run.layouts[0]
    if first.slot_orig.shape[1] == run.length and bool((first.slot_orig == identity_index(first.slot_orig)).all()):
        return layout.slot_orig.clamp(min=0)
    inverse = torch.zeros(run.batch, run.length, dtype=torch.long, device=layout.slot_orig.device)
    rows = torch.arange(run.batch, device=inverse.device).unsqueeze(1).expand_as(first.slot_orig)
    slots = identity_index(first.slot_orig)
    inverse[rows[first.slot_valid], first.slot_orig[first.slot_valid]] = slots[first.slot_valid]
    return inverse.gather(1, layout.slot_orig.clamp(min=0))


def _policy_in_force(run: _Run, layer: int) -> tuple[Tensor, Tensor] | None:
    """Mask mode: the (policy, bias) decoder layer ``layer`` sees: the visual policy in force times, from the eviction
    layer on, the answer tokens' policy."""
    found = run.policy_at(layer)
    generated = run.generated_policy
    if generated is None or generated[0] > layer:
        return found
    if found is None:
        return generated[1], generated[2]
    policy = found[0] * generated[1]
    return policy, attn.policy_bias(policy)


def _cache_layers(cache, method: str) -> list:
    """The cache's per-layer storage, if it is transformers' dynamic one (the only one whose layers can shrink)."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if layers is None or not all(isinstance(layer, DynamicLayer) and not layer.is_sliding for layer in layers):
        raise ValueError(
            f"{method} evicts generated tokens' KV entries, which needs transformers' DynamicCache (generate()'s "
            f"default); got {type(cache).__name__}."
        )
    return list(layers)


def _pack_generated(states: Tensor, start: int, width: int, source: Tensor | None) -> Tensor:
    """``[B, H, S, d]`` cache states with the generated part (from slot ``start``) cut to ``width`` slots: its first
    ``width`` (``source`` None) or each row's ``source`` slots ``[B, width]``."""
    generated = states[:, :, start:]
    if source is None:
        kept = generated[:, :, :width]
    else:
        index = source[:, None, :, None].expand(-1, states.shape[1], -1, states.shape[3])
        kept = generated.gather(2, index.to(states.device))
    return torch.cat([states[:, :, :start], kept], dim=2)


def _cache_length(cache) -> int:
    return int(cache.get_seq_length()) if cache is not None else 0


def _row_repeat(kinds: Tensor, calls: list[TowerCall]) -> int:
    """How many LLM rows each encoded sample fills: ``generate()`` encodes the images once, then repeats each
    sample's row for its beams / returned sequences (``repeat_interleave``), so the rows hold k copies."""
    encoded = sum(call.tokens for call in calls)
    visual = int((kinds != TEXT).sum())
    if not calls or encoded in (0, visual):
        return 1
    repeat = visual // encoded
    if (
        visual % encoded
        or kinds.shape[0] % repeat
        or not torch.equal(kinds, kinds[::repeat].repeat_interleave(repeat, 0))
    ):
        raise ValueError(
            f"the inputs hold {visual} visual tokens but the vision tower encoded {encoded}; "
            "the image placeholders must match the images passed."
        )
    return repeat


def _per_sample_counts(budget: Budget, sites: list[str], num_visual: Tensor) -> dict[str, Tensor]:
    """Visual tokens each sample keeps after each site: the budget applied to that sample's own count."""
    out = {site: torch.zeros_like(num_visual) for site in sites}
    by_count: dict[int, dict[str, int]] = {}
    for b, n in enumerate(num_visual.tolist()):
        if n == 0 or not sites:
            continue
        if n not in by_count:
            by_count[n] = budget.counts(sites, n)
        for site in sites:
            out[site][b] = by_count[n][site]
    return out


def _relayout(layout: _Layout, keep: Tensor, start_layer: int) -> tuple[_Layout, Tensor]:
    """The layout of the kept slots (``tokensift.compact.padded_layout``) with its source slots; the layout itself
    (and an identity source) when ``keep`` drops nothing."""
    slot_orig, slot_valid, source = padded_layout(layout.slot_orig, layout.slot_valid, keep)
    if slot_orig is layout.slot_orig:
        return layout, source
    return _Layout(start_layer, slot_orig, slot_valid), source


__all__ = ["GeneratedTokens", "MLLMGeneratedRecord", "MLLMPruningHandle", "MLLMSiteRecord"]
