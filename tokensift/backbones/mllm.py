"""Adapters for multimodal LLMs: LLaVA (CLIP / SigLIP tower + projector + Llama / Qwen2 LM), Qwen2-VL and Molmo2.

Like the vision adapter, this only *names* things in an unmodified transformers model: its vision tower,
projector, language model and decoder layers, the sites, and how to read each sample's visual tokens from
its inputs. Everything a family does differently lives in one ``MLLMFamily`` subclass, so adding
LLaVA-OneVision or Qwen2.5-VL is one more class in ``FAMILIES``, not a branch in the reduction code.

Sites, in depth order:

- ``vit.<i>``: output of vision block ``i`` (LLaVA's CLIP / SigLIP tower through the vision adapter;
  Qwen2-VL's packed tower by merge groups, ``tokensift.reduce_packed``);
- ``pre_llm``: the LLM's input embeddings, after the projector and before decoder layer 0;
- ``llm.<k>``: the input of decoder layer ``k`` (``k >= 1``; attention-based methods read layer ``k-1``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from tokensift.backbones.vision import _VOLATILE_CONFIG_KEYS, FINGERPRINT_VERSION, VisionAdapter, weights_fingerprint

TEXT, IMAGE, VIDEO = 0, 1, 2
_VIT_SITE = re.compile(r"^vit\.(-?\d+)$")
_LLM_SITE = re.compile(r"^llm\.(-?\d+)$")
PRE_LLM = "pre_llm"


@dataclass(frozen=True)
class Site:
    """A parsed site name: ``kind`` is ``vit``, ``pre_llm`` or ``llm``; ``index`` the block or layer."""

    name: str
    kind: str
    index: int

    @property
    def depth(self) -> tuple[int, int]:
        return ({"vit": 0, "pre_llm": 1, "llm": 2}[self.kind], self.index)


@dataclass
class TowerCall:
    """One call of the vision tower in a forward pass, with what the attention capture stored for it."""

    grid_thw: Tensor | None  # Qwen2-VL: the grids this call encoded (images or videos); LLaVA: None
    tokens: int  # visual tokens this call puts in the LLM's input
    attention: list[Tensor]  # one [1 | n, H, Nq, Nk] tensor per attention call of the scored block
    keys: list[Tensor]  # head-averaged keys, one tensor per attention call
    kept: Tensor | None = None  # vit.<i> sites: [tokens] bool, which of this call's LLM tokens the tower kept
    policy: Tensor | None = None  # vit.<i> sites in mask mode: [tokens] float, the tower's keep policy per LLM token
    # families whose tower arguments do not say what the call encodes (Molmo2: the grids and pooling indices reach
    # get_image_features / get_video_features): IMAGE or VIDEO, [items] LLM tokens per image / video, [tokens, 3]
    # (t, h, w) of each token in its item's grid (MLLMFamily.describe_call)
    kind: int | None = None
    item_tokens: Tensor | None = None
    coords: Tensor | None = None
    pooling: Tensor | None = None  # Molmo2: [tokens, k] the call's patches (flattened over crops) each token pools


class MLLMFamily:
    """How one model family lays out its parts and its visual tokens. Subclass per family."""

    name: ClassVar[str]
    model_classes: ClassVar[tuple[str, ...]]
    multimodal_rope: ClassVar[bool] = False  # position ids are [3, B, L] (M-RoPE) rather than [B, L]
    # the tower runs every image as one packed sequence and merges patch groups into LLM tokens (Qwen2-VL):
    # vit.<i> sites run through tokensift.reduce_packed instead of the vision adapter
    packed_tower: ClassVar[bool] = False
    # of the packed towers, one that runs frames / crops as a [frames, patches, D] batch and pools windows of patches
    # named by the processor into LLM tokens (Molmo2): ``watch_feature_calls`` / ``pooled_layout`` describe its calls
    frame_batched_tower: ClassVar[bool] = False

    # -- parts --------------------------------------------------------------------------------
    def tower(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def language_model(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def tower_blocks(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def tower_attention(self, block: nn.Module) -> nn.Module:
        raise NotImplementedError

    def scored_tower_block(self, model: nn.Module) -> int:
        """The tower block whose attention ranks visual tokens (VisionZip): the one producing the features."""
        raise NotImplementedError

    def vision_adapter(self, model: nn.Module) -> VisionAdapter | None:
        """An adapter for ``vit.<i>`` sites of a ``[B, N, D]`` tower; ``None`` for a packed tower."""
        return None

    def merge_size(self, model: nn.Module) -> int:
        """Packed towers: the side of the patch groups the tower merges into one LLM token."""
        raise NotImplementedError

    def call_kinds(self, model: nn.Module, inputs: dict, calls: list[TowerCall], kinds: Tensor) -> list[int]:
        """IMAGE or VIDEO for each tower call, in order: whose placeholders the call's features fill."""
        return [IMAGE] * len(calls)

    def projector(self, model: nn.Module) -> nn.Module:
        """The module that turns the tower's tokens into LLM features (``vit.<i>`` sites hook its output;
        a packed tower's merger)."""
        raise NotImplementedError

    def features_per_image(self, model: nn.Module) -> int:
        """LLM tokens (features) one image fills, when that is fixed (``vit.<i>`` sites)."""
        raise NotImplementedError

    def last_vit_site(self, model: nn.Module) -> int:
        """Deepest ``vit.<i>`` site: a block strictly before the one whose output becomes the features."""
        return self.scored_tower_block(model) - 1

    # -- visual tokens ------------------------------------------------------------------------
    def token_kinds(self, model: nn.Module, inputs: dict) -> Tensor:
        """``[B, L]`` long: TEXT, IMAGE or VIDEO for each input token, read from the inputs."""
        raise NotImplementedError

    def token_layout(
        self, model: nn.Module, inputs: dict, kinds: Tensor, calls: list[TowerCall]
    ) -> tuple[Tensor, Tensor]:
        """``image_id [B, L]`` (-1 text) and ``coords [B, L, 3]`` ((t, h, w) in the image's token grid).

        ``calls`` are the tower calls that encoded this input (``generate()`` encodes images before the
        first forward and passes the model no grids, only the features).
        """
        raise NotImplementedError

    def tower_token_scores(
        self, model: nn.Module, calls: list[TowerCall], kinds: Tensor, inputs: dict
    ) -> tuple[Tensor, Tensor]:
        """Per LLM token: ``[B, L]`` importance from the tower's attention and ``[B, L, Dk]`` tower keys."""
        raise NotImplementedError

    def encoded_tokens(self, model: nn.Module, args: tuple, kwargs: dict) -> int:
        """Visual tokens a tower call with these arguments puts in the LLM's input."""
        raise NotImplementedError

    def decode_position_ids(self, model: nn.Module, positions: Tensor) -> Tensor:
        """Position ids the LM expects for 1-D text positions ``[B, q]`` of newly decoded tokens."""
        return positions

    def lm_padding_mask(self, inputs: dict | None, lm_kwargs: dict) -> Tensor | None:
        """The 2-D ``[B, L]`` padding mask of the LLM's input: the LM's own ``attention_mask`` argument, unless the
        model builds the 4-D mask before calling the LM (Molmo2), in which case the model's input carries it."""
        return lm_kwargs.get("attention_mask")

    def block_sequence_ids(self, model: nn.Module, inputs: dict) -> Tensor | None:
        """``[B, L]`` long for ``create_causal_mask``: tokens sharing an id ``>= 0`` attend to each other both ways in
        the prefill (Molmo2's multimodal block), ``-1`` causal; ``None`` for a purely causal LM."""
        return None

    def describe_call(self, call: TowerCall, kind: int, pooling: Tensor, grids: Tensor) -> None:
        """Complete ``call`` from what the model's feature method was given (``watch_feature_calls`` families)."""
        raise NotImplementedError


def _scatter_visual(values: Tensor, kinds: Tensor, kind: int, fill: float = 0.0) -> Tensor:
    """Place per-visual-token ``values`` ([T] or [T, D]) at the tokens of ``kind``, in row-major batch order.

    That is the order in which the models' own ``masked_scatter`` fills placeholders with features.
    """
    shape = (*kinds.shape, *values.shape[1:])
    out = torch.full(shape, fill, dtype=values.dtype, device=values.device)
    slots = kinds == kind
    if int(slots.sum()) != values.shape[0]:
        raise ValueError(
            f"the inputs hold {int(slots.sum())} visual tokens but the vision tower produced {values.shape[0]}; "
            "the placeholder tokens must match the images passed."
        )
    out[slots] = values
    return out


def _same(a: Tensor | None, b: Tensor | None) -> bool:
    return a is b or (a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b.to(a.device))))


class LlavaFamily(MLLMFamily):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def tower(self, model):
        return model.model.vision_tower

    def language_model(self, model):
        return model.model.language_model

    def tower_blocks(self, model):
        return VisionAdapter(self.tower(model)).layers

    def tower_attention(self, block):
        return block.self_attn

    def _feature_layer(self, model) -> int:
        layer = model.config.vision_feature_layer
        return min(layer) if isinstance(layer, (list, tuple)) else layer

    def scored_tower_block(self, model) -> int:
        num_blocks = len(self.tower_blocks(model))
        index = self._feature_layer(model)
        index = index if index >= 0 else num_blocks + 1 + index  # hidden_states index: 0 is the embeddings
        if index < 1:
            raise ValueError("vision_feature_layer selects the patch embeddings; no tower block produces them.")
        return index - 1

    def vision_adapter(self, model):
        return VisionAdapter(self.tower(model))

    def projector(self, model):
        return model.model.multi_modal_projector

    def features_per_image(self, model):
        return self._tokens_per_image(model)[0]

    def _has_cls(self, model) -> bool:
        return type(self.tower(model)).__name__ == "CLIPVisionModel"

    def _tokens_per_image(self, model) -> tuple[int, int]:
        """(tokens each image puts in the LLM sequence, of which special tokens before the patch grid)."""
        vision = model.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        prefix = 1 if self._has_cls(model) and model.config.vision_feature_select_strategy == "full" else 0
        return prefix + side * side, prefix

    def encoded_tokens(self, model, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        return int(pixel_values.shape[0]) * self._tokens_per_image(model)[0]

    def token_kinds(self, model, inputs):
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "tokensift finds LLaVA's image tokens from input_ids (image_token_id); "
                "pass input_ids, not inputs_embeds."
            )
        return (input_ids == model.config.image_token_id).long() * IMAGE

    def token_layout(self, model, inputs, kinds, calls):
        per_image, prefix = self._tokens_per_image(model)
        side = int(model.config.vision_config.image_size) // int(model.config.vision_config.patch_size)
        visual = kinds == IMAGE
        counts = visual.sum(1)
        if bool((counts % per_image).any()):
            raise ValueError(
                f"each LLaVA image fills {per_image} image tokens, but the samples hold {counts.tolist()}; "
                "expand every <image> placeholder to image_seq_length tokens (the processor does)."
            )
        order = torch.arange(int(counts.sum()), device=kinds.device)  # flattened visual tokens, batch order
        patch = order % per_image - prefix
        image_id = torch.full(kinds.shape, -1, dtype=torch.long, device=kinds.device)
        image_id[visual] = order // per_image
        coords = torch.full((*kinds.shape, 3), -1, dtype=torch.long, device=kinds.device)
        on_grid = torch.stack([torch.zeros_like(patch), patch // side, patch % side], dim=-1)
        coords[visual] = torch.where((patch >= 0).unsqueeze(-1), on_grid, torch.full_like(on_grid, -1))
        return image_id, coords

    def tower_token_scores(self, model, calls, kinds, inputs):
        if len(calls) != 1 or len(calls[0].attention) != 1:
            raise ValueError("LLaVA encodes all images of a batch in one tower call; got a different pattern.")
        attention, keys = calls[0].attention[0], calls[0].keys[0]  # [n_img, H, N, N], [n_img, N, Dk]
        attention = attention.float().sum(dim=1)
        # [CLS] attention ranks tokens as VisionZip does; without [CLS] (SigLIP), the attention each token receives
        score = attention[:, 0, :] if self._has_cls(model) else attention.mean(dim=1)
        if self._has_cls(model) and model.config.vision_feature_select_strategy == "default":
            score, keys = score[:, 1:], keys[:, 1:]  # LLaVA drops [CLS] from the features
        score = _scatter_visual(score.reshape(-1), kinds, IMAGE)
        keys = _scatter_visual(keys.reshape(-1, keys.shape[-1]).float(), kinds, IMAGE)
        return score, keys


class Qwen2VLFamily(MLLMFamily):
    name = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    multimodal_rope = True
    packed_tower = True

    def tower(self, model):
        return model.model.visual

    def language_model(self, model):
        return model.model.language_model

    def tower_blocks(self, model):
        return self.tower(model).blocks

    def tower_attention(self, block):
        return block.attn

    def scored_tower_block(self, model) -> int:
        return len(self.tower_blocks(model)) - 1  # the merger reads the last block's output

    def projector(self, model):
        return self.tower(model).merger

    def merge_size(self, model) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    def call_kinds(self, model, inputs, calls, kinds):
        image_grids = self._grids_by_kind(model, inputs, calls, kinds)[IMAGE]
        return [IMAGE if _same(call.grid_thw, image_grids) else VIDEO for call in calls]

    def encoded_tokens(self, model, args, kwargs):
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        return int(grid.prod(-1).sum()) // self.merge_size(model) ** 2

    def token_kinds(self, model, inputs):
        types = inputs.get("mm_token_type_ids")
        if types is not None:
            return types.long()
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError("tokensift finds Qwen2-VL's visual tokens from mm_token_type_ids or input_ids; pass one.")
        config = model.config
        return (input_ids == config.image_token_id).long() * IMAGE + (input_ids == config.video_token_id).long() * VIDEO

    def _merged_grids(self, model, grid_thw: Tensor | None) -> list[tuple[int, int, int]]:
        merge = self.merge_size(model)
        if grid_thw is None:
            return []
        return [(int(t), int(h) // merge, int(w) // merge) for t, h, w in grid_thw.tolist()]

    def _grids_by_kind(self, model, inputs: dict, calls: list[TowerCall], kinds: Tensor) -> dict[int, Tensor | None]:
        """The (t, h, w) patch grids of the images and of the videos, from the inputs or the tower calls."""
        grids = {IMAGE: inputs.get("image_grid_thw"), VIDEO: inputs.get("video_grid_thw")}
        merge = self.merge_size(model) ** 2
        for call in calls:
            if call.grid_thw is None or any(_same(call.grid_thw, g) for g in grids.values()):
                continue
            tokens = int(call.grid_thw.prod(-1).sum()) // merge
            kind = IMAGE if grids[IMAGE] is None and tokens == int((kinds == IMAGE).sum()) else VIDEO
            grids[kind] = call.grid_thw if grids[kind] is None else grids[kind]
        return grids

    def token_layout(self, model, inputs, kinds, calls):
        by_kind = self._grids_by_kind(model, inputs, calls, kinds)
        grids = {
            IMAGE: iter(self._merged_grids(model, by_kind[IMAGE])),
            VIDEO: iter(self._merged_grids(model, by_kind[VIDEO])),
        }
        image_id = torch.full(kinds.shape, -1, dtype=torch.long)
        coords = torch.full((*kinds.shape, 3), -1, dtype=torch.long)
        kinds_cpu = kinds.cpu()
        next_id = 0
        for b in range(kinds.shape[0]):
            i, length = 0, kinds.shape[1]
            while i < length:
                kind = int(kinds_cpu[b, i])
                if kind == TEXT:
                    i += 1
                    continue
                grid = next(grids[kind], None)
                if grid is None:
                    name = "image_grid_thw" if kind == IMAGE else "video_grid_thw"
                    raise ValueError(f"sample {b} has more visual tokens than {name} describes.")
                t, h, w = grid
                count = t * h * w
                span = kinds_cpu[b, i : i + count]
                if span.numel() != count or bool((span != kind).any()):
                    raise ValueError(f"sample {b}: a visual span at token {i} does not match its grid {grid}.")
                grid_t, grid_h, grid_w = torch.meshgrid(
                    torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"
                )  # row-major, the order the merger emits tokens in
                coords[b, i : i + count] = torch.stack([grid_t, grid_h, grid_w], dim=-1).reshape(count, 3)
                image_id[b, i : i + count] = next_id
                next_id += 1
                i += count
        return image_id.to(kinds.device), coords.to(kinds.device)

    def tower_token_scores(self, model, calls, kinds, inputs):
        group = self.merge_size(model) ** 2
        by_kind = {}
        for call, kind in zip(calls, self.call_kinds(model, inputs, calls, kinds), strict=True):
            # attention runs once per frame chunk (cu_seqlens); a patch's score is the attention it receives
            score = torch.cat([a.float().sum(dim=1).mean(dim=1).reshape(-1) for a in call.attention])
            keys = torch.cat([k.float().reshape(-1, k.shape[-1]) for k in call.keys])
            # the merger joins each run of `group` consecutive patches into one LLM token
            score = score.reshape(-1, group).sum(dim=1)
            keys = keys.reshape(-1, group, keys.shape[-1]).mean(dim=1)
            by_kind[kind] = (score, keys)
        scores = torch.zeros(kinds.shape, device=kinds.device)
        dim = next(iter(by_kind.values()))[1].shape[-1]
        keys = torch.zeros((*kinds.shape, dim), device=kinds.device)
        for kind, (score, key) in by_kind.items():
            scores = scores + _scatter_visual(score.to(kinds.device), kinds, kind)
            keys = keys + _scatter_visual(key.to(kinds.device), kinds, kind)
        return scores, keys

    def decode_position_ids(self, model, positions):
        deltas = model.model.rope_deltas
        if deltas is not None:
            positions = positions + deltas.to(positions.device).reshape(-1, 1)
        return positions.unsqueeze(0).expand(3, -1, -1)


class Molmo2Family(MLLMFamily):
    """Molmo2: a SigLIP-style ViT over image crops / video frames, an attention-pooling adapter
    (``multi_modal_projector``: each LLM token cross-attends to the patches ``*_token_pooling`` names) and a
    1-D-RoPE LM in which a sample's multimodal tokens (``mm_token_type_ids == 1``: patches, column, start and
    end tokens of every image or frame) attend to each other bidirectionally.

    Images and videos share one placeholder (``image_patch_id``) and never come in one call together, so a
    token's kind (IMAGE or VIDEO) is the kind of the pixels the call carries.
    """

    name = "molmo2"
    model_classes = ("Molmo2ForConditionalGeneration",)
    packed_tower = True  # vit.<i> sites by pooled windows, through tokensift.reduce_packed
    frame_batched_tower = True

    def tower(self, model):
        return model.model.vision_tower

    def language_model(self, model):
        return model.model.language_model

    def tower_blocks(self, model):
        return self.tower(model).layers

    def tower_attention(self, block):
        return block.self_attn

    def projector(self, model):
        return model.model.multi_modal_projector

    def feature_layers(self, model) -> list[int]:
        """Tower blocks (0-based) whose outputs the adapter concatenates, in the adapter's order."""
        num_blocks = len(self.tower_blocks(model))
        layers = model.config.adapter_config.vision_feature_layer
        return [layer if layer >= 0 else num_blocks + layer for layer in layers]

    def scored_tower_block(self, model) -> int:
        return max(self.feature_layers(model))  # the deepest block the adapter reads

    def token_kinds(self, model, inputs):
        input_ids = inputs.get("input_ids")
        if input_ids is None:
            raise ValueError(
                "tokensift finds Molmo2's visual tokens from input_ids (image_patch_id); pass input_ids, not "
                "inputs_embeds."
            )
        # generate() encodes before the first forward and passes the features as mm_encoder_outputs["video" | "image"]
        encoded = inputs.get("mm_encoder_outputs") or {}
        videos = any(inputs.get(name) is not None for name in ("pixel_values_videos", "video_grids"))
        kind = VIDEO if videos or encoded.get("video") is not None else IMAGE
        return (input_ids == model.config.image_patch_id).long() * kind

    def encoded_tokens(self, model, args, kwargs):
        return 0  # the tower sees pixels only; describe_call sets the count from the grids of the feature call

    def describe_call(self, call, kind, pooling, grids):
        counts, coords = self.pooled_layout(kind, pooling, grids)
        call.kind, call.grid_thw, call.item_tokens, call.coords = kind, grids, counts, coords
        call.tokens, call.pooling = int(counts.sum()), pooling

    def call_kinds(self, model, inputs, calls, kinds):
        fallback = VIDEO if bool((kinds == VIDEO).any()) else IMAGE
        return [fallback if call.kind is None else call.kind for call in calls]

    def lm_padding_mask(self, inputs, lm_kwargs):
        # Molmo2Model builds the 4-D mask (with its multimodal block) before the LM: the 2-D one is the model's input
        return lm_kwargs.get("attention_mask") if inputs is None else inputs.get("attention_mask")

    def block_sequence_ids(self, model, inputs):
        # what Molmo2Model.forward passes create_causal_mask in the prefill: one bidirectional block per sample over
        # its multimodal tokens (patches and their start / end / column tokens), the rest causal
        types = inputs.get("mm_token_type_ids")
        return None if types is None else torch.where(types == 1, 0, -1)

    def token_layout(self, model, inputs, kinds, calls):
        kind = VIDEO if bool((kinds == VIDEO).any()) else IMAGE
        name = "video" if kind == VIDEO else "image"
        described = [call for call in calls if call.coords is not None and call.kind == kind]
        if described:
            counts = torch.cat([call.item_tokens for call in described])
            flat = torch.cat([call.coords for call in described])
        elif inputs.get(f"{name}_grids") is not None and inputs.get(f"{name}_token_pooling") is not None:
            counts, flat = self.pooled_layout(kind, inputs[f"{name}_token_pooling"], inputs[f"{name}_grids"])
        else:
            raise ValueError(
                f"tokensift reads Molmo2's {name} token grids from {name}_grids and {name}_token_pooling, or from the "
                f"model's get_{name}_features call; pass them with the pixels (as the processor returns them)."
            )
        visual = kinds != TEXT
        per_sample = visual.sum(1).cpu()
        if int(counts.sum()) != int(per_sample.sum()):
            raise ValueError(
                f"the inputs hold {int(per_sample.sum())} {name} tokens but the {name} grids describe "
                f"{int(counts.sum())}; the placeholders must match the {name}s passed."
            )
        item_ends = set(counts.cpu().cumsum(0).tolist())
        sample_ends = [end for end in per_sample.cumsum(0).tolist() if end > 0]
        if not set(sample_ends) <= item_ends:
            raise ValueError(
                f"a {name} straddles two samples: the samples hold {per_sample.tolist()} {name} tokens, the {name}s "
                f"{counts.tolist()}; each sample's placeholders must cover whole {name}s."
            )
        image_id = torch.full(kinds.shape, -1, dtype=torch.long, device=kinds.device)
        coords = torch.full((*kinds.shape, 3), -1, dtype=torch.long, device=kinds.device)
        items = torch.arange(counts.numel(), device=kinds.device)
        image_id[visual] = items.repeat_interleave(counts.to(kinds.device))  # row-major batch order, as the model fills
        coords[visual] = flat.to(kinds.device)
        return image_id, coords

    def tower_token_scores(self, model, calls, kinds, inputs):
        by_kind = {}
        for call, kind in zip(calls, self.call_kinds(model, inputs, calls, kinds), strict=True):
            if call.pooling is None or len(call.attention) != 1:
                raise ValueError(
                    "Molmo2 runs the tower once per get_image_features / get_video_features call, all crops as one "
                    "batch; call the model (or generate()), not its vision tower directly."
                )
            # the scored block (the deepest the adapter reads) runs every crop at once: [crops, H, P, P]; a patch's
            # score is the attention it receives (no [CLS]), its key the head-averaged key
            score = call.attention[0].float().sum(dim=1).mean(dim=1).reshape(-1)
            keys = call.keys[0].float().reshape(-1, call.keys[0].shape[-1])
            # an LLM token pools a window of patches (-1: padding): its score is their sum, its key their mean
            pooling = call.pooling.to(score.device)
            valid = pooling >= 0
            index = pooling.clamp(min=0)
            token_score = (score[index] * valid).sum(dim=1)
            token_keys = (keys[index] * valid.unsqueeze(-1)).sum(dim=1) / valid.sum(1, keepdim=True).clamp(min=1)
            by_kind[kind] = (token_score[valid.any(1)], token_keys[valid.any(1)])
        scores = torch.zeros(kinds.shape, device=kinds.device)
        dim = next(iter(by_kind.values()))[1].shape[-1]
        keys = torch.zeros((*kinds.shape, dim), device=kinds.device)
        for kind, (score, key) in by_kind.items():
            scores = scores + _scatter_visual(score.to(kinds.device), kinds, kind)
            keys = keys + _scatter_visual(key.to(kinds.device), kinds, kind)
        return scores, keys

    # -- the tower's calls (vit.<i> sites through tokensift.reduce_packed) ----------------------------------------
    def watch_feature_calls(self, model, on_call) -> Callable[[], None]:
        """Call ``on_call(kind, pooling, grids)`` before each tower call that encodes features for the LLM; returns
        the function that stops watching.

        The tower is called with pixels only; which patches each LLM token pools (``*_token_pooling``) and the grids
        reach ``get_image_features`` / ``get_video_features`` (``generate()`` calls them before the first forward), so
        those two methods of the ``Molmo2Model`` instance are wrapped, one wrapper for every watcher.
        """
        base = model.model
        watchers = base.__dict__.get("_tokensift_feature_watchers")
        if watchers is None:
            watchers = base._tokensift_feature_watchers = []
            running: list[int] = []  # get_video_features calls get_image_features: only the outer call is told
            for name, kind in (("get_image_features", IMAGE), ("get_video_features", VIDEO)):
                setattr(base, name, _watched(getattr(base, name), kind, watchers, running))
        watchers.append(on_call)

        def stop() -> None:
            if on_call in watchers:
                watchers.remove(on_call)
            if not watchers and base.__dict__.get("_tokensift_feature_watchers") is watchers:
                for name in ("get_image_features", "get_video_features", "_tokensift_feature_watchers"):
                    base.__dict__.pop(name, None)

        return stop

    def pooled_layout(self, kind: int, pooling: Tensor, grids: Tensor) -> tuple[Tensor, Tensor]:
        """``[items]`` LLM tokens of each image / video of a call (the model's own split sizes) and ``[G, 3]`` the
        (t, h, w) of each token in its item's token grid: a video's frame, row, column; an image's low-res crop
        (t = 0) then its high-res crops' pooled canvas (t = 1)."""
        coords, counts = [], []
        for grid in grids.tolist():
            if kind == VIDEO:  # (frames, rows, cols)
                parts = [(t, grid[1], grid[2]) for t in range(grid[0])]
            else:  # (low-res rows, cols, high-res rows, cols), low-res tokens first
                parts = [(0, grid[0], grid[1]), (1, grid[2], grid[3])]
            count = 0
            for t, rows, cols in parts:
                h, w = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
                coords.append(torch.stack([torch.full_like(h, t), h, w], dim=-1).reshape(-1, 3))
                count += rows * cols
            counts.append(count)
        total = sum(counts)
        if total != pooling.shape[0]:
            name = "video" if kind == VIDEO else "image"
            raise ValueError(
                f"{name}_token_pooling has {pooling.shape[0]} rows but {name}_grids describe {total} tokens; pass the "
                "processor's pooling indices and grids together."
            )
        device = pooling.device
        return torch.tensor(counts, device=device), torch.cat(coords).to(device)


def _watched(method, kind: int, watchers: list, running: list):
    """``method`` (a bound ``get_*_features``) telling each watcher its kind, pooling indices and grids first, unless
    it runs inside another watched call (``running``): Molmo2's video features are its image features of the frames,
    with the video grids rewritten as image grids."""

    # generate() calls it by keyword, with the names of its signature (pixel_values_videos, video_token_pooling, ...),
    # which functools.wraps exposes: bind whatever arrives to the original's parameters, in order
    signature = inspect.signature(method)

    @functools.wraps(method)
    def features(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        _, token_pooling, grids = list(bound.arguments.values())[:3]
        if not running:
            for on_call in list(watchers):
                on_call(kind, token_pooling, grids)
        running.append(kind)
        try:
            return method(*args, **kwargs)
        finally:
            running.pop()

    return features


FAMILIES: dict[str, MLLMFamily] = {}
for _family in (LlavaFamily(), Qwen2VLFamily(), Molmo2Family()):
    for _cls in _family.model_classes:
        FAMILIES[_cls] = _family


def is_multimodal(model: nn.Module) -> bool:
    return type(model).__name__ in FAMILIES


class MLLMAdapter:
    """Names the sites of a transformers multimodal LLM: ``vit.<i>``, ``pre_llm`` and ``llm.<k>``."""

    is_multimodal = True

    def __init__(self, model: nn.Module):
        head = type(model).__name__
        if head not in FAMILIES:
            raise TypeError(f"tokensift has no multimodal adapter for {head}; supported: {sorted(FAMILIES)}.")
        self.model = model
        self.family = FAMILIES[head]
        self.tower: nn.Module = self.family.tower(model)
        self.language_model: nn.Module = self.family.language_model(model)
        self.layers: nn.ModuleList = self.language_model.layers
        self.attention_modules: list[nn.Module] = [layer.self_attn for layer in self.layers]
        self.tower_blocks: nn.ModuleList = self.family.tower_blocks(model)
        self.config = model.config
        self.text_config = self.language_model.config
        self._vision_adapter: VisionAdapter | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def vision_adapter(self) -> VisionAdapter:
        if self._vision_adapter is None:
            self._vision_adapter = self.family.vision_adapter(self.model)
        if self._vision_adapter is None:
            raise ValueError(
                f"{type(self.model).__name__}'s tower packs every image into one sequence; its vit.<i> sites run "
                "through tokensift.reduce_packed, not a vision adapter."
            )
        return self._vision_adapter

    # -- sites ----------------------------------------------------------------------------------
    def sites(self) -> list[str]:
        vit = [f"vit.{i}" for i in range(self.family.last_vit_site(self.model) + 1)]
        return [*vit, PRE_LLM, *(f"llm.{k}" for k in range(1, self.num_layers))]

    def parse_site(self, site: str) -> Site:
        if site == PRE_LLM:
            return Site(site, "pre_llm", -1)
        match = _LLM_SITE.match(site)
        if match and 1 <= int(match.group(1)) < self.num_layers:
            return Site(site, "llm", int(match.group(1)))
        match = _VIT_SITE.match(site)
        last_vit = self.family.last_vit_site(self.model)
        if match and 0 <= int(match.group(1)) <= last_vit:
            return Site(site, "vit", int(match.group(1)))
        vit = f"vit.0 .. vit.{last_vit}, " if last_vit >= 0 else ""
        raise ValueError(
            f"site {site!r} does not exist on this {self.family.name} model; valid sites are {vit}pre_llm and "
            f"llm.1 .. llm.{self.num_layers - 1} (llm.<k> is the input of decoder layer k; pre_llm is llm.0)."
        )

    def spread_llm_sites(self, count: int) -> list[str]:
        """``count`` LLM sites at equal depth fractions (PyramidDrop's stages at 1/4, 1/2, 3/4 of 32 layers)."""
        n = self.num_layers
        layers = sorted({max(1, min(n - 1, round(n * (s + 1) / (count + 1)))) for s in range(count)})
        return [f"llm.{k}" for k in layers]

    # -- identity -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        for sub in ("text_config", "vision_config", "adapter_config"):
            if isinstance(cfg.get(sub), dict):
                cfg[sub] = {k: v for k, v in cfg[sub].items() if k not in _VOLATILE_CONFIG_KEYS}
        config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
        # every parameter: tower, projector and language model (see weights_fingerprint); taken before LoRA
        digest, groups = weights_fingerprint(self.model)
        return {
            "model_class": type(self.model).__name__,
            "model_type": self.config.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": int(self.text_config.num_attention_heads),
            "config_hash": config_hash,
            "weights_digest": digest,
            "weights_groups": groups,
            "fingerprint_version": FINGERPRINT_VERSION,
        }
