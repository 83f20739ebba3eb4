"""Backbone adapters: name the sites of an unmodified transformers model."""

from torch import nn

from tokensift.backbones.loading import load_backbone
from tokensift.backbones.mllm import MLLMAdapter, is_multimodal
from tokensift.backbones.vision import VisionAdapter


def adapt(model: nn.Module) -> VisionAdapter | MLLMAdapter:
    """The adapter for ``model``: a multimodal LLM (LLaVA, Qwen2-VL) or a vision transformer."""
    return MLLMAdapter(model) if is_multimodal(model) else VisionAdapter(model)


__all__ = ["MLLMAdapter", "VisionAdapter", "adapt", "load_backbone"]
