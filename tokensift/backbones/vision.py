"""Adapters for Hugging Face vision transformers: ViT, CLIP vision and SigLIP vision towers.

An adapter only *names* things in an unmodified model: the tower, its blocks, the sites, how its head
pools tokens. The reduction mechanism (``tokensift.reduce``) hooks what the adapter names.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Pooling = Literal["cls", "mean_patches", "mean_all", "attention_pool"]
SITE_PATTERN = re.compile(r"^vit\.(-?\d+)$")

# config fields that do not change what a scorer sees, so they stay out of the fingerprint's hash
_VOLATILE_CONFIG_KEYS = {
    "_name_or_path",
    "transformers_version",
    "_attn_implementation",
    "_attn_implementation_autoset",
    "attn_implementation",
    "torch_dtype",
    "dtype",
    "architectures",
    "id2label",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "use_cache",
    "return_dict",
}


FINGERPRINT_VERSION = 2  # 1: a hash of the patch embedding only (vision) / 64 embedding rows (MLLM)
_SAMPLES_PER_TENSOR = 256


def weights_fingerprint(module: nn.Module) -> tuple[str, dict[str, str]]:
    """A digest of every parameter of ``module``, overall and per group (block), cheap on any model size.

    Each tensor contributes its name, shape, dtype and a fixed strided sample of ``_SAMPLES_PER_TENSOR``
    values (every value of a smaller tensor), so a different layer anywhere changes the digest while a 7B
    model costs a few hundred small gathers. A group is the name up to its first block index
    (``encoder.layer.3``), else the parameter's module (``embeddings.patch_embeddings.projection``).
    """
    overall = hashlib.sha256()
    groups: dict[str, hashlib._Hash] = {}
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        tensor = param.detach()
        flat = tensor.reshape(-1)
        stride = max(1, -(-flat.numel() // _SAMPLES_PER_TENSOR))
        sample = flat[::stride].to("cpu", torch.float32).numpy().tobytes()
        record = f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode() + sample
        overall.update(record)
        groups.setdefault(_weight_group(name), hashlib.sha256()).update(record)
    return overall.hexdigest()[:16], {group: digest.hexdigest()[:12] for group, digest in groups.items()}


def _weight_group(name: str) -> str:
    parts = name.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: index + 1])
    return ".".join(parts[:-1]) or name


@dataclass
class _Family:
    tower_types: tuple[str, ...]
    layers_path: str  # attribute path from the tower to its ModuleList of blocks
    final_token_path: str  # module whose output is the per-token state the head pools
    attention_attr: str  # the attention module inside a block
    num_prefix: int  # special tokens before the patches ([CLS]); SigLIP has none


_FAMILIES = {
    "vit": _Family(("ViTModel",), "layers", "layernorm", "attention", 1),
    "clip": _Family(("CLIPVisionModel",), "encoder.layers", "encoder.layers.-1", "self_attn", 1),
    "siglip": _Family(("SiglipVisionModel",), "encoder.layers", "post_layernorm", "self_attn", 0),
}

# head class -> (attribute holding the tower, how the head pools the tower's tokens)
_HEADS = {
    "ViTForImageClassification": ("vit", "cls"),
    "ViTModel": ("", "cls"),
    "CLIPForImageClassification": ("vision_model", "mean_patches"),
    "CLIPVisionModel": ("", "cls"),
    "CLIPVisionModelWithProjection": ("vision_model", "cls"),
    "SiglipForImageClassification": ("vision_model", "mean_all"),
    "SiglipVisionModel": ("", "attention_pool"),
}


def _get(module: nn.Module, path: str) -> nn.Module:
    for part in path.split(".") if path else []:
        module = module[int(part)] if part.lstrip("-").isdigit() else getattr(module, part)
    return module


class VisionAdapter:
    """Names the sites ``vit.<i>`` (output of block ``i``) of a transformers vision transformer."""

    def __init__(self, model: nn.Module):
        head = type(model).__name__
        if head not in _HEADS:
            raise TypeError(
                f"tokensift has no adapter for {head}; supported models: {sorted(_HEADS)}. "
                "Wrap or convert the model to one of these classes."
            )
        tower_attr, self.pooling = _HEADS[head]
        self.model = model
        self.tower: nn.Module = _get(model, tower_attr)
        tower_type = type(self.tower).__name__
        self.family = next(name for name, fam in _FAMILIES.items() if tower_type in fam.tower_types)
        fam = _FAMILIES[self.family]
        self.layers: nn.ModuleList = _get(self.tower, fam.layers_path)
        self.final_token_module: nn.Module = _get(self.tower, fam.final_token_path)
        self.attention_modules: list[nn.Module] = [getattr(layer, fam.attention_attr) for layer in self.layers]
        self.num_prefix = fam.num_prefix
        self.config = self.tower.config

    # -- geometry -------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def has_classifier(self) -> bool:
        return hasattr(self.model, "classifier")

    def grid_for(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        return pixel_values.shape[-2] // self.patch_size, pixel_values.shape[-1] // self.patch_size

    def default_grid(self) -> tuple[int, int]:
        side = int(self.config.image_size) // self.patch_size
        return side, side

    def check_pixel_values(self, pixel_values, interpolate: bool = False) -> None:
        """A ValueError naming ``pixel_values`` when it is not ``[batch, channels, height, width]`` of the model's
        channel count and (unless ``interpolate_pos_encoding=True``) its image size."""
        channels, size = getattr(self.config, "num_channels", None), getattr(self.config, "image_size", None)
        expected = f"[batch, {channels}, {size}, {size}]"
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a tensor {expected} for this model, got {shape}.")
        if channels is not None and pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels (shape {tuple(pixel_values.shape)}); this model "
                f"takes {channels}: {expected}."
            )
        if size is not None and not interpolate and tuple(pixel_values.shape[-2:]) != (size, size):
            raise ValueError(
                f"pixel_values is {pixel_values.shape[-2]}x{pixel_values.shape[-1]} px; this model takes "
                f"{size}x{size}: {expected} (resize the images, or pass interpolate_pos_encoding=True where the "
                "model supports it)."
            )

    def num_patches(self) -> int:
        rows, cols = self.default_grid()
        return rows * cols

    # -- sites ----------------------------------------------------------------------------------
    def sites(self) -> list[str]:
        return [f"vit.{i}" for i in range(self.num_layers)]

    def layer_of(self, site: str) -> int:
        match = SITE_PATTERN.match(site)
        if not match or not 0 <= int(match.group(1)) < self.num_layers - 1:
            raise ValueError(
                f"site {site!r} does not exist on this {self.family} backbone; "
                f"valid sites are vit.0 .. vit.{self.num_layers - 2} (output of block i, "
                "with at least one block left to benefit)."
            )
        return int(match.group(1))

    def spread_sites(self, count: int) -> list[str]:
        """``count`` sites at equal depth fractions, as DynamicViT's blocks 3/6/9 of 12."""
        n = self.num_layers
        layers = sorted({max(0, min(n - 2, round(n * (s + 1) / (count + 1)) - 1)) for s in range(count)})
        return [f"vit.{i}" for i in layers]

    # -- forward --------------------------------------------------------------------------------
    def logits(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if not self.has_classifier:
            raise TypeError(
                f"{type(self.model).__name__} has no classification head; training a scorer needs "
                "ViTForImageClassification, CLIPForImageClassification or SiglipForImageClassification."
            )
        return self.model(pixel_values=pixel_values).logits

    # -- identity -------------------------------------------------------------------------------
    def fingerprint(self) -> dict:
        """What an artifact records of the backbone it was trained on, to refuse a different one.

        Take it before LoRA layers are injected or ZeRO-3 partitions the parameters: both change what
        ``named_parameters`` shows (the trainers take it at construction).
        """
        cfg = {k: v for k, v in self.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
        config_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]
        # every tower parameter (the head never changes what a scorer sees): see weights_fingerprint
        digest, groups = weights_fingerprint(self.tower)
        return {
            "model_class": type(self.model).__name__,
            "model_type": self.config.model_type,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": int(self.config.num_attention_heads),
            "image_size": int(self.config.image_size),
            "patch_size": self.patch_size,
            "config_hash": config_hash,
            "weights_digest": digest,
            "weights_groups": groups,
            "fingerprint_version": FINGERPRINT_VERSION,
        }


def adapt(model: nn.Module) -> VisionAdapter:
    return VisionAdapter(model)
